"""The web app without a browser (fast): the data-driven method list and the ``main.py`` command
lines it builds (composed by Hydra for every method, base and data source), input checks, the
progress callback, and the HTTP API in-process on the toy base: bad input gives a message and
the server keeps serving; sampling with one delta, and with two merged deltas. The browser test
is test_app_browser.py."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from app import deltas as dl
from app.methods import (
    METHODS_FILE,
    InputError,
    TrainRequest,
    changed,
    check_class_word,
    command,
    load_methods,
    with_defaults,
)
from app.progress import ProgressLog
from app.sampling import check_prompt
from app.uploads import read_images
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def methods():
    return {m.recipe: m for m in with_defaults(load_methods())}


def png_item(name: str = "a.png", size: int = 40) -> dict[str, str]:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return {
        "name": name,
        "data": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
    }


def test_methods_follow_recipes(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "finetune_noreg.yaml").write_text("{}\n")
    assert [m.recipe for m in load_methods(METHODS_FILE, configs)] == ["finetune_noreg"]
    (configs / "finetune_vico.yaml").write_text("{}\n")
    assert [m.recipe for m in load_methods(METHODS_FILE, configs)] == [
        "finetune_noreg",
        "finetune_vico",
    ]
    real = [m.recipe for m in load_methods()]
    assert real[:3] == ["finetune_noreg", "finetune_gen", "finetune_real"]
    assert "finetune_real" not in [m.recipe for m in load_methods(base="sd15")]  # toy-only


@pytest.mark.parametrize("base", ["toy", "sd15"])
def test_every_method_command_composes(methods, base, tmp_path):
    """The overrides of every method (bundled concept and uploaded images) are valid Hydra
    overrides of its recipe and set what the page asked for."""
    sd_methods = {m.recipe for m in load_methods(base=base)}
    for m in methods.values():
        if m.recipe not in sd_methods:
            continue
        sources = [("images", None, tmp_path / "imgs")]
        if base == "toy":
            sources.append(("concept", "striped_circle", None))
        for _, concept, images in sources:
            word = "circle" if m.class_words == "toy_shapes" or concept else "cup"
            req = TrainRequest(m, base, word, 7, 3e-5, tmp_path / "run", concept, images, 3,
                               Path("/models/sd.safetensors"))  # fmt: skip
            argv = command(req)
            assert argv[:3] == ["main.py", "--config-name", m.recipe_for(base)]
            overrides = [o for o in argv[3:] if not o.startswith("hydra.run.dir")]
            cfg = compose_config(argv[2], overrides, tmp_path / "run")
            assert cfg.trainer.max_steps == 7
            assert cfg.callbacks.app_progress.path == str(tmp_path / "run" / "progress.jsonl")
            text = json.dumps(
                [OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                 else cfg[k] for k in ("data", "prepare", "class_word") if k in cfg],
                default=str,
            )  # fmt: skip
            where = str(images) if images else concept
            assert where in text, (m.recipe, base, where)
            if base == "sd15":
                assert cfg.model.ckpt == "/models/sd.safetensors" and cfg.resolution == 512


def test_unchanged_overrides_are_left_out(methods):
    m = methods["finetune_noreg"]
    d = m.defaults  # the recipe's own concept, class word, steps and lr: nothing to override
    req = TrainRequest(m, "toy", d["class_word"], d["steps"], d["lr"], Path("/r"), d["concept"])
    assert [a for a in command(req)[3:] if not a.startswith(("hydra.", "+app"))] == []
    steps = d["steps"]
    kept = changed([f"trainer.max_steps={steps}", f"trainer.max_steps={steps + 1}", "+x=1"],
                   m.recipe_cfg)  # fmt: skip
    assert kept == [f"trainer.max_steps={steps + 1}", "+x=1"]


def test_class_word_checks(methods):
    from transformers import CLIPTokenizer

    from ldm.modules.encoders.clip import TOKENIZER_DIR

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert check_class_word("  Dog ", methods["finetune_noreg"], "toy", tok) == "dog"
    for word, method, msg in [
        ("", "finetune_noreg", "missing"),
        ("dog; rm -rf", "finetune_noreg", "letters"),
        ("dog", "finetune_real", "one of its shapes"),
        ("zorblax", "finetune_vico", "one CLIP token"),
    ]:
        with pytest.raises(InputError, match=msg):
            check_class_word(word, methods[method], "toy", tok)


def test_uploaded_images_are_checked():
    assert len(read_images([png_item(f"{i}.png") for i in range(3)])) == 3
    with pytest.raises(InputError, match="you gave 2"):
        read_images([png_item(), png_item()])
    bad = {"name": "x.txt", "data": base64.b64encode(b"hello").decode()}
    with pytest.raises(InputError, match=r"x.txt \(not an image\).*tiny.png \(only 8x8"):
        read_images([png_item(), bad, png_item("tiny.png", 8)])
    truncated = png_item("cut.png")
    truncated["data"] = truncated["data"][:80]
    with pytest.raises(InputError, match="cut.png"):
        read_images([png_item(), png_item(), truncated])


def test_prompt_checks(tiny_model):
    from ldm.modules.tokens import add_placeholder_tokens

    with pytest.raises(InputError, match="82 tokens long.*shorten it by 5"):
        check_prompt(tiny_model, " ".join(["red circle"] * 40))
    with pytest.raises(InputError, match=r"unknown token <new1>, v1\*.*none \(no delta"):
        check_prompt(tiny_model, "a <new1> and a v1* triangle")
    add_placeholder_tokens(tiny_model.cond_stage_model, ["<new1>"])
    assert check_prompt(tiny_model, "a photo of a <new1> triangle", toy=True) == []
    warn = check_prompt(tiny_model, "a photo of a <new1> dog on the beach", toy=True)
    assert "dog, on, the, beach" in warn[0]
    with pytest.raises(InputError, match=r"unknown token \*"):
        check_prompt(tiny_model, "a photo of a *")  # ViCo's placeholder, without its checkpoint


def test_rename_plan():
    def info(tokens):
        return dl.DeltaInfo(Path("x"), "x", "custom_diffusion", tokens, 0, None, None, 0.0)

    plan = dl.rename_plan([info(["<new1>"]), info(["<new1>"]), info(["v1*", "v2*"]), info(["v1*"])])
    assert plan == [["<new1>"], ["<new2>"], ["v1*", "v2*"], ["v1*_2"]]


def test_progress_callback_stops_and_saves(tmp_path):
    cb = ProgressLog(str(tmp_path / "p.jsonl"), str(tmp_path / "STOP"), str(tmp_path / "ck"))
    trainer = SimpleNamespace(global_step=1, max_steps=10, global_rank=0, should_stop=False,
                              callback_metrics={"train/loss": torch.tensor(0.5)})  # fmt: skip
    module = SimpleNamespace(export_state_dict=lambda: {"w": torch.ones(2)},
                             export_metadata=lambda: {"step": "2"})  # fmt: skip
    cb.on_train_start(trainer, module)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert not trainer.should_stop
    (tmp_path / "STOP").touch()
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, module, None, None, 1)
    assert trainer.should_stop
    cb.on_exception(trainer, module, KeyboardInterrupt())
    from app.jobs import read_progress
    from ldm.checkpoint import load_state_dict

    prog = read_progress(tmp_path / "p.jsonl")
    assert prog["steps"] == [1, 2] and prog["losses"] == [0.5, 0.5] and prog["max_steps"] == 10
    assert prog["events"] == ["start", "stopping", "exception"]
    assert torch.equal(load_state_dict(tmp_path / "ck" / "last.safetensors")["w"], torch.ones(2))


# ---------------------------------------------------------------- the HTTP API, in-process
def fake_delta(model, path: Path, token: str, seed: int) -> Path:
    """A Custom Diffusion delta of ``model``: its K/V moved a little and one token row."""
    from custom.compose import KV
    from custom.delta import make_metadata
    from custom.formats import ROWS
    from ldm.checkpoint import fingerprint, save_state_dict

    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    tensors = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items() if KV.search(k)
    }
    tensors[ROWS] = torch.randn(
        1, model.cond_stage_model.token_embedding.embedding_dim, generator=g
    )
    meta = make_metadata(fingerprint(sd, exclude=tensors), [token], "custom_diffusion", 5,
                         freeze_model="crossattn_kv")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, path, metadata=meta)
    return path


@pytest.fixture(scope="module")
def server(methods, tmp_path_factory):
    from app.sampling import Base
    from app.server import App, make_server

    logs = tmp_path_factory.mktemp("logs")
    app = App(Base("toy", "toy", None), logs, list(methods.values()), "toy note")
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", logs
    srv.shutdown()
    srv.server_close()


def call(base: str, path: str, body=None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            raw = res.read()
            ctype = res.headers["Content-Type"]
            return res.status, json.loads(raw) if ctype == "application/json" else raw
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sample(base: str, body: dict) -> dict:
    status, state = call(base, "/api/sample", body)
    assert status == 200, state
    deadline = time.time() + 120
    while state["status"] in ("loading", "sampling") and time.time() < deadline:
        time.sleep(0.2)
        state = call(base, "/api/sample/status")[1]
    return state


def test_api_bad_input_keeps_serving(server, tmp_path):
    url, logs = server
    status, info = call(url, "/api/info")
    assert status == 200 and info["base"]["is_toy"] and info["base"]["note"] == "toy note"
    cases = [
        ("/api/train", {"method": "nope"}, "Choose a method"),
        ("/api/train", {"method": "finetune_noreg", "class_word": "cup", "steps": 5, "lr": 1e-5},
         "Choose a bundled concept"),
        ("/api/train", {"method": "finetune_noreg", "class_word": "cup", "steps": "x", "lr": 1},
         "whole numbers"),
        ("/api/train", {"method": "finetune_noreg", "class_word": "cup", "steps": 5, "lr": 1e-5,
                        "images": [png_item(), {"name": "b.pdf", "data": "aGk="}, png_item()]},
         r"b.pdf (not an image)"),
        ("/api/plan", {"deltas": ["/etc/passwd"]}, "not inside the app's logs folder"),
        ("/api/deltas/upload", {"name": "d.ckpt", "data": "aGk="}, "python -m custom import"),
        ("/api/deltas/upload", {"name": "d.safetensors", "data": "aGk="}, "not a readable"),
        ("/api/compare", {"runs": []}, "Tick at least one run"),
    ]  # fmt: skip
    for path, body, msg in cases:
        status, out = call(url, path, body)
        assert status == 400 and msg in out["error"], (path, out)
    assert call(url, "/files/../../etc/passwd")[0] == 404
    assert not (logs / "app_runs").exists()  # nothing was started
    state = sample(url, {"prompt": "a photo of a <new1> circle", "steps": 2, "n": 1})
    assert state["status"] == "error" and "unknown token <new1>" in state["message"]
    state = sample(url, {"prompt": "a photo of a red circle", "steps": 2, "n": 1,
                         "attend_excite": True, "words": "square"})  # fmt: skip
    assert state["status"] == "error" and "'square'" in state["message"]
    assert call(url, "/api/info")[0] == 200  # still serving


def test_api_samples_with_one_and_two_deltas(server):
    from ldm import load_model

    url, logs = server
    base = load_model(None, "toy")
    a = fake_delta(base, logs / "app_uploads" / "deltas" / "a.safetensors", "<new1>", 1)
    b = fake_delta(base, logs / "app_uploads" / "deltas" / "b.safetensors", "<new1>", 2)
    other = logs / "app_uploads" / "deltas" / "other.safetensors"
    shutil.copy(a, other)
    from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict

    save_state_dict(load_state_dict(a), other, {**read_metadata(a), "base_hash": "0" * 16})
    listed = {Path(d["path"]).name for d in call(url, "/api/deltas")[1]}
    assert {"a.safetensors", "b.safetensors", "other.safetensors"} <= listed

    state = sample(url, {"deltas": [str(a)], "prompt": "a photo of a <new1> circle", "steps": 3,
                         "n": 2, "seed": 5})  # fmt: skip
    assert state["status"] == "done", state["message"]
    images = state["result"]["images"]
    assert [Path(u.split("?")[0]).name for u in images] == ["00005.png", "00006.png"]
    assert Image.open(io.BytesIO(call(url, images[0].split("?")[0])[1])).size == (32, 32)
    for fmt in ("compvis", "adobe", "diffusers"):
        status, data = call(url, f"/api/export?delta={a}&format={fmt}")
        assert status == 200 and len(data) > 1000, fmt

    plan = call(url, "/api/plan", {"deltas": [str(a), str(b)]})[1]
    assert [d["tokens_in_prompt"] for d in plan["deltas"]] == [["<new1>"], ["<new2>"]]
    state = sample(url, {"deltas": [str(a), str(b)], "prompt": "a <new1> circle and a <new2> ring",
                         "steps": 3, "n": 1})  # fmt: skip
    assert state["status"] == "error" and "class word of every concept" in state["message"]
    state = sample(
        url,
        {
            "deltas": [str(a), str(b)],
            "class_words": ["circle", "ring"],
            "prompt": "a <new1> circle and a <new2> ring",
            "steps": 3,
            "n": 1,
        },
    )
    assert state["status"] == "done", state["message"]
    merged = dl.describe(Path(state["result"]["delta_path"]))
    assert merged.tokens == ["<new1>", "<new2>"]

    state = sample(url, {"deltas": [str(other)], "prompt": "a red circle", "steps": 2, "n": 1})
    assert state["status"] == "error" and "does not fit this base model" in state["message"]
    assert "other.safetensors" in state["message"] and str(logs) not in state["message"]
