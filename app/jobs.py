"""Background jobs: one ``main.py`` training or evaluation process at a time (CPU is scarce).

A job is a child process in its own session writing ``job.log`` in its folder. Training also
writes ``progress.jsonl`` (``app/progress.py``). Cancelling first asks for a graceful stop (the
``STOP`` file: training ends after the current step and saves its delta as usual); a process
that has not stopped after ``grace`` seconds, or is not training yet, is terminated, and its
progress callback still saves the delta reached.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.methods import ROOT

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Job:
    kind: str  # "train" or "evaluate"
    dir: Path
    argv: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    cancelled: bool = False
    cancel_time: float | None = None

    @property
    def log_file(self) -> Path:
        return self.dir / "job.log"

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        if self.running:
            return "stopping" if self.cancelled else "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if self.returncode == 0 else "failed"


def read_progress(path: Path) -> dict[str, Any]:
    """Steps, losses and events of a ``progress.jsonl`` (partial last lines skipped)."""
    steps, losses, times, events = [], [], [], []
    max_steps = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" in rec:
                events.append(rec["event"])
                max_steps = rec.get("max_steps", max_steps)
                continue
            steps.append(rec["step"])
            losses.append(rec.get("loss"))
            times.append(rec.get("time"))
            max_steps = rec.get("max_steps", max_steps)
    return {"steps": steps, "losses": losses, "times": times, "events": events,
            "max_steps": max_steps}  # fmt: skip


def tail(path: Path, n: int = 12) -> list[str]:
    """The last ``n`` non-empty lines (progress-bar carriage returns folded)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 20_000))
        text = f.read().decode("utf-8", "replace")
    lines = [seg.split("\r")[-1].rstrip() for seg in text.split("\n")]
    return [line for line in lines if line.strip()][-n:]


def error_line(lines: list[str]) -> str | None:
    """The most telling line of a failed run's log (an ``error:`` line or the exception)."""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("error:") or "Error:" in text or text.startswith("Error"):
            return text
    return lines[-1] if lines else None


class JobRunner:
    """Runs one job at a time; keeps the last one for the status page."""

    def __init__(self, grace: float = 30.0) -> None:
        self.grace = grace
        self.job: Job | None = None
        self.lock = threading.Lock()

    def busy(self) -> Job | None:
        return self.job if self.job is not None and self.job.running else None

    def start(self, kind: str, run_dir: Path, argv: list[str], info: dict[str, Any]) -> Job:
        with self.lock:
            if (current := self.busy()) is not None:
                raise RuntimeError(
                    f"A {current.kind} job is still running ({current.dir.name}): wait for it "
                    "or cancel it first."
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            job = Job(kind, run_dir, argv, dict(info))
            (run_dir / "app_job.json").write_text(
                json.dumps({"kind": kind, "argv": argv, **info}, indent=1, default=str)
            )
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
            env.setdefault("OMP_NUM_THREADS", "1")
            with job.log_file.open("w") as out:
                out.write("$ python " + " ".join(argv) + "\n")
                out.flush()
                job.proc = subprocess.Popen(
                    [_python(), *argv],
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its own process group, terminated as one
                )
            log.info("started %s job pid %d in %s", kind, job.proc.pid, run_dir)
            self.job = job
            return job

    def cancel(self) -> Job | None:
        job = self.busy()
        if job is None:
            return None
        job.cancelled = True
        job.cancel_time = job.cancel_time or time.time()
        (job.dir / "STOP").touch()
        if job.kind != "train" or not read_progress(job.dir / "progress.jsonl")["steps"]:
            self._terminate(job)  # nothing trained yet (or not training): no need to wait
        return job

    def poll(self) -> None:
        """Escalate a graceful stop that takes too long."""
        job = self.busy()
        if job and job.cancelled and job.cancel_time and time.time() - job.cancel_time > self.grace:
            self._terminate(job)

    @staticmethod
    def _terminate(job: Job) -> None:
        if job.proc is not None and job.proc.poll() is None:
            log.info("terminating job pid %d", job.proc.pid)
            with contextlib.suppress(ProcessLookupError):  # the group this job's Popen created
                os.killpg(job.proc.pid, signal.SIGTERM)

    def shutdown(self) -> None:
        job = self.busy()
        if job is not None:
            (job.dir / "STOP").touch()
            self._terminate(job)
            try:
                job.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)


def _python() -> str:
    import sys

    return sys.executable


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def images_in(folder: Path) -> list[Path]:
    """Images in ``folder``, oldest first."""
    return _files(folder, IMAGE_SUFFIXES)


def deltas_in(folder: Path) -> list[Path]:
    """Saved ``.safetensors`` in ``folder``, oldest first."""
    return _files(folder, (".safetensors",))


def seconds_per_step(prog: dict[str, Any]) -> float | None:
    """Recent training speed from a :func:`read_progress` record."""
    times, steps = [t for t in prog["times"] if t is not None], prog["steps"]
    if len(times) < 2 or steps[-1] == steps[0]:
        return None
    return round((times[-1] - times[0]) / (steps[-1] - steps[0]), 3)


def phase(job: Job, prog: dict[str, Any]) -> str:
    """What a training job is doing, in words."""
    if not job.running:
        return job.status()
    if job.cancelled:
        return "stopping (saving the delta and the final samples)"
    if not prog["events"]:
        return "starting (loading the model, preparing the data)"
    done = prog["steps"] and prog["max_steps"] and prog["steps"][-1] >= prog["max_steps"]
    if done or "stopping" in prog["events"] or "end" in prog["events"]:
        return "finishing (saving the delta, sampling the final grid)"
    return "training"
