"""Evaluation: reference formulas by hand, CLIP/DINO scorers on random weights, prompts, and a
tiny trained run end to end (fixed seeds, resumable sampling, metrics.json, report, comparison).
The report's test in a real browser is in test_evaluation_browser.py."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from evaluation import prompts as prompt_lib
from evaluation.scorers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Context,
    Sample,
    image_alignment,
    reference_transform,
    text_alignment,
)
from tests.conftest import ROOT, SHARED, compose_config

CC101 = SHARED / "data" / "customconcept101"


def optional(name: str):
    """Import ``name`` or skip (torchvision beside a CPU torch may raise RuntimeError)."""
    try:
        return __import__(name)
    except Exception as exc:
        pytest.skip(f"{name} unavailable: {str(exc).splitlines()[0]}")


def random_images(folder: Path, sizes, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(1, keepdims=True))


# ----------------------------------------------------------------------------------- formulas
def test_formulas_by_hand():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[4.0, 3.0], [-1.0, 0.0], [0.0, 5.0]])
    # 2.5 * cos: 2.5 * 24/25, negative cosine clipped to 0, identical directions 2.5
    assert text_alignment(img, txt).tolist() == pytest.approx([2.4, 0.0, 2.5])
    refs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = [(0.6 + 1.4 / 2**0.5) / 2, (1 + 1 / 2**0.5) / 2, (0 + 1 / 2**0.5) / 2]
    assert image_alignment(img, refs).tolist() == pytest.approx(expected)


def test_reference_transform_resizes_shorter_side_and_centre_crops():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue: cropped away
    x = reference_transform(im, 16, 16, (0, 0, 0), (1, 1, 1))
    assert x.shape == (3, 16, 16)
    assert x[0].min() > 0.95 and x[2].max() < 0.05  # all red after the 32x16 -> 16x16 crop


def test_reference_transform_equals_torchvision():
    tv = optional("torchvision")
    from torchvision import transforms as T

    pipe = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])  # fmt: skip
    dino = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    assert tv
    rng = np.random.default_rng(1)
    for w, h in [(32, 32), (300, 200), (200, 513), (224, 224)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = reference_transform(im, 224, 224, CLIP_MEAN, CLIP_STD)
        assert torch.allclose(pipe(im), ours, atol=1e-6)
        ours = reference_transform(im, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(dino(im), ours, atol=1e-6)


# ----------------------------------------------------------------------------------- CLIP
def tiny_hf_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "max_position_embeddings": 77,
    }
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 1, "image_size": 32, "patch_size": 8}  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def samples_for(paths, texts):
    pairs = zip(paths, texts, strict=True)
    return [Sample(p, t, t, "concept", i) for i, (p, t) in enumerate(pairs)]


def hand_clip_scores(encode_image, encode_text, gen, texts, refs, size):
    """CustomConcept101's evaluate.py arithmetic in numpy, on the model's raw features."""

    def feats(paths):
        x = torch.stack([reference_transform(Image.open(p), size, size, CLIP_MEAN, CLIP_STD)
                         for p in paths])  # fmt: skip
        with torch.no_grad():
            return encode_image(x).double().numpy()

    g, r = unit(feats(gen)), unit(feats(refs))
    with torch.no_grad():
        t = unit(encode_text(texts).double().numpy())
    return 2.5 * np.clip((g * t).sum(1), 0, None), (g @ r.T).mean(1)


def test_clip_scorer_random_transformers_model_matches_hand(tmp_path):
    from evaluation.clip import ClipScorer, TransformersBackend

    model = tiny_hf_clip(seed=1)
    backend = TransformersBackend(model)
    gen = random_images(tmp_path / "gen", [(32, 32), (48, 40), (64, 64), (40, 40)])
    refs = random_images(tmp_path / "ref", [(50, 50), (32, 70)], seed=1)
    texts = ["a photo of a dog.", "a dog in times square", "a red car",
             "The cat, surrounded by towering skyscrapers!"]  # fmt: skip
    out = ClipScorer(backend=backend, batch_size=2)(samples_for(gen, texts), refs, Context())

    def encode_text(t):
        batch = backend.tokenizer(t, padding="max_length", max_length=77, return_tensors="pt")
        return model.get_text_features(**batch)

    text, image = hand_clip_scores(lambda x: model.get_image_features(pixel_values=x),
                                   encode_text, gen, texts, refs, 32)  # fmt: skip
    assert out["clip_text"] == pytest.approx(text.tolist(), abs=1e-5)
    assert out["clip_image"] == pytest.approx(image.tolist(), abs=1e-5)
    assert min(out["clip_text"]) == 0 < max(out["clip_text"])  # clipped and unclipped cases


def test_open_clip_scorer_and_conversion(tmp_path):
    open_clip = optional("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from evaluation.clip import (
        ClipScorer,
        OpenClipBackend,
        TransformersBackend,
        clip_from_open_clip,
    )

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1,
                                      layers=2)).eval()  # fmt: skip
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    gen = random_images(tmp_path / "gen", [(32, 32), (40, 60)])
    refs = random_images(tmp_path / "ref", [(32, 32)], seed=3)
    texts = ["The cat, surrounded by towering skyscrapers!", "photo of a cat."]
    scorer = ClipScorer(backend=OpenClipBackend(model, tokenizer))
    out = scorer(samples_for(gen, texts), refs, Context())
    text, image = hand_clip_scores(model.encode_image, lambda t: model.encode_text(tokenizer(t)),
                                   gen, texts, refs, 32)  # fmt: skip
    assert out["clip_text"] == pytest.approx(text.tolist(), abs=1e-5)
    assert out["clip_image"] == pytest.approx(image.tolist(), abs=1e-5)
    # The same weights as a state-dict file, through transformers: same scores.
    path = tmp_path / "open_clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    hf = ClipScorer(pretrained=str(path), model_name="ViT-B-32-quickgelu", backend="transformers")
    again = hf(samples_for(gen, texts), refs, Context())
    assert again["clip_text"] == pytest.approx(out["clip_text"], abs=1e-4)
    assert again["clip_image"] == pytest.approx(out["clip_image"], abs=1e-4)
    assert isinstance(hf.backend, TransformersBackend)
    with pytest.raises(ValueError, match="not an open_clip"):
        clip_from_open_clip({"x": torch.zeros(1)})


def test_clip_backend_errors_are_one_line(tmp_path):
    from evaluation.clip import ClipScorer

    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        _ = ClipScorer(pretrained=str(tmp_path / "none"), backend="transformers").backend
    with pytest.raises(ValueError, match="backend must be"):
        _ = ClipScorer(backend="nope").backend
    optional("open_clip")
    with pytest.raises(RuntimeError, match="open_clip cannot load RN-none/openai"):
        _ = ClipScorer(pretrained="openai", model_name="RN-none", backend="open_clip").backend


# ----------------------------------------------------------------------------------- DINO
def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=32,
                    intermediate_size=128, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
    return ViTModel(cfg, add_pooling_layer=False).eval()


def test_dino_scorer_random_model_matches_hand(tmp_path):
    from evaluation.dino import DinoScorer

    model = tiny_vit()
    gen = random_images(tmp_path / "gen", [(32, 32), (64, 40)])
    refs = random_images(tmp_path / "ref", [(40, 40), (36, 50), (33, 33)], seed=2)
    out = DinoScorer(model=model)(samples_for(gen, ["a", "b"]), refs, Context())

    def feats(paths):  # Resize(256/224 * crop) + CenterCrop(crop), ImageNet stats, CLS token
        x = torch.stack([reference_transform(Image.open(p), 37, 32, IMAGENET_MEAN, IMAGENET_STD)
                         for p in paths])  # fmt: skip
        with torch.no_grad():
            return unit(model(pixel_values=x).last_hidden_state[:, 0].double().numpy())

    expected = (feats(gen) @ feats(refs).T).mean(1)
    assert out["dino_image"] == pytest.approx(expected.tolist(), abs=1e-6)


def test_dino_conversion_matches_timm(tmp_path):
    timm = optional("timm")
    from evaluation.dino import DinoScorer

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                            img_size=32, depth=2).eval()  # fmt: skip
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)  # DINO's own files have this layout
    scorer = DinoScorer(weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = scorer.model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(want, got, atol=1e-5)
    with pytest.raises(ValueError, match="scorers.dino.weights"):
        DinoScorer()


# ----------------------------------------------------------------------------------- prompts
def test_prompt_phrases_and_expansion(tmp_path):
    assert prompt_lib.concept_phrases("a photo of a <new1> triangle", ["<new1>"]) == (
        "<new1> triangle", "triangle")  # fmt: skip
    assert prompt_lib.concept_phrases("photo of v1* v2* person", ["v1*", "v2*"])[1] == "person"
    assert prompt_lib.concept_phrases("photo of a dog", []) == ("dog", "dog")
    f = tmp_path / "p.txt"
    f.write_text("# comment\n{} swimming in a pool.\n\nphoto of a {class}.\n")
    src = prompt_lib.resolve(str(f))
    got = prompt_lib.expand(src, "<new1> dog", "dog")
    assert [(p.prompt, p.text, p.kind) for p in got] == [
        ("<new1> dog swimming in a pool.", "dog swimming in a pool.", "concept"),
        ("photo of a dog.", "photo of a dog.", "prior"),
    ]
    f.write_text("{0} and {1} on a beach\n")
    with pytest.raises(ValueError, match="multi-concept"):
        prompt_lib.resolve(str(f))
    with pytest.raises(FileNotFoundError, match="not a file"):
        prompt_lib.resolve("no-such-prompts", tmp_path)
    with pytest.raises(ValueError, match="toy-world run"):
        prompt_lib.resolve("toy")


def test_toy_prompts_are_the_toy_benchmark_families():
    from toyworld.metrics import alignment_prompts, concept_prompts

    src = prompt_lib.resolve("toy", toy_concept="twotone_square")
    got = prompt_lib.expand(src, "<new1> square", "square")
    by_kind = {k: [p.prompt for p in got if p.kind == k] for k in prompt_lib.KINDS}
    assert by_kind["concept"] == concept_prompts("twotone_square", "<new1>")
    assert by_kind["align"] == [p for p, _ in alignment_prompts("twotone_square", "<new1>")]
    assert by_kind["prior"] == concept_prompts("twotone_square", None)


@pytest.mark.skipif(not CC101.exists(), reason="shared/data/customconcept101 not present")
def test_customconcept101_concept():
    src = prompt_lib.resolve("pet_cat1", CC101)
    assert src.concept_phrase == "<new1> cat" and src.class_phrase == "cat"
    assert len(src.templates) == 20 and all("{}" in t for t in src.templates)
    assert src.targets.name == "pet_cat1"
    assert prompt_lib.resolve("barn", CC101).name == "scene_barn"


def test_toy_judge_scorer_on_rendered_scenes(tmp_path):
    from evaluation.scorers import ToyJudgeScorer
    from toyworld.concepts import CONCEPTS
    from toyworld.world import ObjectSpec, render_scene

    square = CONCEPTS["twotone_square"].object(0.5, (0.3, 0.3))
    circle = ObjectSpec("circle", "red", "plain", None, size=0.35, position=(0.75, 0.75))
    scenes = [[square, circle], [square], [circle]]
    paths = []
    for i, objs in enumerate(scenes):
        paths.append(tmp_path / f"{i}.png")
        render_scene(objs, 32, (235, 235, 235)).save(paths[-1])
    texts = ["a photo of a square and a red circle"] * 2 + ["a photo of a square"]
    samples = [Sample(p, t, t, "align", 0) for p, t in zip(paths, texts, strict=True)]
    out = ToyJudgeScorer()(samples, [], Context(toy_concept="twotone_square"))
    assert out["judge_concept"] == [1.0, 1.0, 0.0]
    assert out["judge_text"] == [1.0, 0.0, None]


# ----------------------------------------------------------------------------------- end to end
def make_run(folder: Path, tmp: Path) -> Path:
    """A 2-step Custom Diffusion run of the tiny model, laid out as main.py writes it."""
    from ldm import build_model
    from ldm.checkpoint import save_state_dict
    from main import train
    from tests.test_custom import pretrained_like

    torch.manual_seed(0)
    base = tmp / "tiny_base.safetensors"
    save_state_dict(pretrained_like(build_model("tiny")).state_dict(), base)
    prompt = 'data.train.concepts.0.instance_prompt="a photo of a <new1> triangle"'
    overrides = ["model=tiny", f"model.ckpt={base}", "trainer.max_steps=2", "data.batch_size=2",
                 "logger=null", "callbacks.log_samples=null", "+prepare.concept.n=3",
                 "prepare.concept.name=dotted_triangle", prompt]  # fmt: skip
    cfg = compose_config("finetune_noreg", overrides, folder)
    train(cfg)
    saved = cfg.copy()
    with open_dict(saved):
        del saved["hydra"]
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(saved, folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides[2:4]), folder / ".hydra" / "overrides.yaml")
    return folder


EVAL = ["n_samples=2", "batch_size=2", "sampler.steps=2"]


def run_eval(run: Path, job: Path, extra=()):
    import evaluate

    return evaluate.evaluate(compose_config("evaluate", [f"run={run}", *EVAL, *extra], job))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    run = make_run(tmp / "runs" / "0", tmp)
    metrics = run_eval(run, tmp / "job")
    return run, metrics


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        self.srcs += [v for k, v in attrs if k in ("src", "href") and tag in ("img", "a")]


def test_evaluate_writes_metrics_and_report(evaluated):
    run, metrics = evaluated
    out = run / "eval" / "toy"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["aggregate"] == metrics["aggregate"]
    assert saved["toy_concept"] == "dotted_triangle" and saved["step"] == 2
    assert saved["concept_phrase"] == "<new1> triangle"
    rows = saved["per_prompt"]
    assert [r["kind"] for r in rows].count("align") == 6 and len(rows) == 10
    for r in rows:
        assert len(r["images"]) == 2 and all((out / p).exists() for p in r["images"])
        assert [Path(p).name for p in r["images"]] == ["00000.png", "00001.png"]
        assert 0 <= r["metrics"]["judge_concept"] <= 1
    assert saved["aggregate"]["align"]["judge_text"] is not None
    assert saved["aggregate"]["concept"]["judge_text"] is None  # no coloured object asked
    assert len(saved["targets"]) == 3
    parser = Links()
    parser.feed((out / "report.html").read_text())
    images = [s for s in parser.srcs if s.endswith(".png")]
    assert len(images) == 2 * len(rows) and all((out / s).exists() for s in images)


def test_resampling_skips_existing_and_is_deterministic(evaluated, tmp_path):
    run, metrics = evaluated
    out = run / "eval" / "toy"
    first = out / metrics["per_prompt"][0]["images"][0]
    before = first.read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("samples/*/*.png")}
    again = run_eval(run, tmp_path / "job")
    assert again["aggregate"] == metrics["aggregate"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("samples/*/*.png")} == stamps
    first.unlink()  # a lost image comes back identical: same seed, same chunk
    run_eval(run, tmp_path / "job2")
    assert first.read_bytes() == before
    with pytest.raises(ValueError, match="other settings"):
        run_eval(run, tmp_path / "job3", ["guidance_scale=3.0"])


def test_compare_runs_table_and_plot(evaluated, tmp_path):
    import evaluate

    run, _ = evaluated
    sweep = tmp_path / "sweep"
    for i in (1, 0):
        shutil.copytree(run, sweep / str(i), ignore=shutil.ignore_patterns("eval"))
    cfg = compose_config("compare", [f"runs=[{sweep}]", *EVAL, f"out={tmp_path / 'cmp'}"],
                         tmp_path / "job")  # fmt: skip
    files = evaluate.compare(cfg)
    lines = files["md"].read_text().splitlines()
    assert len(lines) == 4 and "judge_concept" in lines[0] and "prior judge_concept" in lines[0]
    assert "| 1 | finetune_noreg" in lines[2]
    summary = json.loads(files["json"].read_text())
    assert [Path(s["run"]).name for s in summary] == ["0", "1"]
    assert summary[0]["judge_concept"] == summary[1]["judge_concept"]  # same weights and seeds
    svg = ET.parse(files["plot_toy_judge"]).getroot()
    assert svg.tag.endswith("svg") and len(svg.findall(".//{*}circle")) == 2
    parser = Links()
    parser.feed(files["html"].read_text())
    assert all((files["html"].parent / s).exists() for s in parser.srcs)


def test_bad_runs_give_clear_errors(tmp_path):
    from evaluation.runs import find_runs, load_run

    with pytest.raises(FileNotFoundError, match="no such run"):
        find_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no runs below"):
        find_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)


def test_evaluate_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "evaluate.py", f"run={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
