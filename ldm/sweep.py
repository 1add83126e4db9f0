"""A summary table of a Hydra multirun (``python main.py -m a=1,2 b=3,4``).

:class:`SweepSummary` is a Hydra callback (``configs/hydra/default.yaml``). After every job and at
the end of the multirun it reads each job folder of the sweep directory -- its overrides
(``.hydra/overrides.yaml``) and the final metrics ``main.train`` saved (``metrics.yaml``) -- and
writes ``summary.csv`` and ``summary.md`` (one row per job, one column per override key and per
metric) into the sweep directory. A job without ``metrics.yaml`` (failed, or not run yet) gets
the status ``no metrics``. Rewriting after each job keeps a table even if a later job crashes.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.yaml"


def _job_number(folder: Path) -> tuple[int, str]:
    return (int(folder.name), "") if folder.name.isdigit() else (1 << 30, folder.name)


def read_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per job folder of ``sweep_dir``: ``job``, ``overrides`` (dict), ``metrics``
    (dict, empty if none) and ``dir``."""
    jobs = []
    root = Path(sweep_dir)
    folders = [p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")]
    for folder in sorted(set(folders), key=_job_number):
        overrides = {}
        for item in OmegaConf.load(folder / ".hydra" / "overrides.yaml") or []:
            key, _, value = str(item).partition("=")
            overrides[key] = value
        metrics_path = folder / METRICS_FILE
        metrics = {}
        if metrics_path.exists():
            metrics = OmegaConf.to_container(OmegaConf.load(metrics_path)) or {}
        jobs.append({
            "job": str(folder.relative_to(root)),
            "overrides": overrides,
            "metrics": dict(metrics),
            "dir": str(folder),
        })  # fmt: skip
    return jobs


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def summary_rows(jobs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): job, override keys (those that vary first), metrics, status."""
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"]))
    varying = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    keys = varying + [k for k in keys if k not in varying]
    metrics = sorted({k for j in jobs for k in j["metrics"]})
    header = ["job", *keys, *metrics, "status"]
    rows = []
    for j in jobs:
        row = [j["job"], *(j["overrides"].get(k, "") for k in keys)]
        row += [_cell(j["metrics"].get(k, "")) for k in metrics]
        rows.append([*row, "ok" if j["metrics"] else "no metrics"])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> Path | None:
    """Write ``summary.csv`` and ``summary.md`` for the jobs in ``sweep_dir``; returns the
    markdown path (None when there is no job folder yet)."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        return None
    header, rows = summary_rows(jobs)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    path = sweep_dir / "summary.md"
    path.write_text(markdown_table(header, rows))
    return path


class SweepSummary(Callback):
    """Hydra callback: write the sweep's summary after each job and at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        hydra_cfg = config.get("hydra")
        if hydra_cfg is None or str(hydra_cfg.get("mode")) != "RunMode.MULTIRUN":
            return
        try:
            write_summary(hydra_cfg.sweep.dir)
        except Exception as exc:  # noqa: BLE001 - a summary must never fail a job
            log.warning("sweep summary not written: %s", exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(config.hydra.sweep.dir)
        if path is None:
            log.warning("sweep summary: no job folders in %s", config.hydra.sweep.dir)
            return
        log.info("sweep summary %s:\n%s", path, path.read_text())
