"""toyworld.metrics and the ToyConceptEval callback: prompts, rates, seeding, judge plumbing
(tiny random model, seconds); the slow test trains Custom Diffusion on the toy base."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.image_io import from_pil
from tests.conftest import compose_config
from toyworld import metrics
from toyworld.concepts import CONCEPTS, concept_images
from toyworld.judge import Judge
from toyworld.world import ObjectSpec, render_scene


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def fake_samples(objects, concepts, seeds):
    n = len(objects)
    return metrics.Samples(["p"] * n, torch.zeros(n, 3, 32, 32), objects, concepts, seeds)


def test_prompts():
    assert metrics.concept_prompts("twotone_square", "<new1>") == [
        "a photo of a <new1> square",
        "a <new1> square",
    ]
    assert metrics.concept_prompts("outlined_triangle", None) == [
        "a photo of a triangle",
        "a triangle",
    ]
    pairs = metrics.alignment_prompts("twotone_square", "<new1>", n_objects=3, n_colours=2)
    assert len(pairs) == 5
    own = {"blue", "orange"}
    for prompt, (colour, shape) in pairs[:3]:
        assert prompt.startswith("a photo of a <new1> square and ")
        assert prompt.endswith(f"{colour} {shape}") and shape != "square" and colour not in own
    for prompt, (colour, shape) in pairs[3:]:
        article = "an" if colour[0] in "aeiou" else "a"
        assert prompt == f"a photo of {article} {colour} <new1> square"
        assert shape == "square" and colour not in own
    with pytest.raises(KeyError, match="unknown concept"):
        metrics.concept_prompts("blue_dog", "<new1>")


def test_rates_count_per_image():
    s = fake_samples(
        objects=[{("red", "circle")}, set(), {("red", "circle"), ("blue", "square")}, set()],
        concepts=[{"twotone_square"}, set(), {"twotone_square"}, {"outlined_triangle"}],
        seeds=2,
    )
    assert metrics.concept_rate(s, "twotone_square") == 0.5
    assert metrics.concept_rate(s, "outlined_triangle") == 0.25
    # prompt 0 (images 0, 1) expects a red circle, prompt 1 (images 2, 3) a blue square
    assert metrics.object_rate(s, [("red", "circle"), ("blue", "square")]) == 0.5
    assert metrics.object_rate(s, [("blue", "square"), ("red", "circle")]) == 0.25
    assert metrics.joint_rate(s, "twotone_square", [("red", "circle"), ("blue", "square")]) == 0.5
    with pytest.raises(ValueError, match="expected objects"):
        metrics.object_rate(s, [("red", "circle")])
    with pytest.raises(KeyError):
        metrics.concept_rate(s, "nope")


def test_judge_samples_on_rendered_images(judge):
    """The plumbing from [0, 1] images to judged sets: drawn concepts and objects are found."""
    circle = render_scene([ObjectSpec("circle", "red", size=0.6)], 32, (240, 240, 240))
    images = (from_pil(concept_images("twotone_square", 4, seed=3) + [circle] * 4) + 1) / 2
    s = metrics.judge_samples(judge, ["a", "b"], images, seeds=4)
    assert len(s) == 8 and s.prompts == ["a"] * 4 + ["b"] * 4
    assert metrics.concept_rate(s, "twotone_square") == 0.5
    assert metrics.object_rate(s, [("blue", "square"), ("red", "circle")]) == 1.0
    with pytest.raises(ValueError, match="images for"):
        metrics.judge_samples(judge, ["a"], images, seeds=4)


def test_sample_is_seeded_per_prompt_and_image(tiny_ldm):
    kw = {"steps": 2, "guidance_scale": 2.0}
    both = metrics.sample(tiny_ldm, ["a red circle", "a blue square"], 2, **kw)
    alone = metrics.sample(tiny_ldm, ["a blue square"], 2, **kw)
    assert both.shape == (4, 3, 32, 32) and both.min() >= 0 and both.max() <= 1
    assert torch.allclose(both[2:], alone, atol=1e-5)  # independent of the other prompts
    assert not torch.allclose(alone[0], alone[1])  # seeds differ within a prompt
    other = metrics.sample(tiny_ldm, ["a blue square"], 2, seed=7, **kw)
    assert not torch.allclose(alone, other)
    with pytest.raises(ValueError):
        metrics.sample(tiny_ldm, [], 2)


def test_evaluate_concept_report(tiny_ldm, judge):
    report = metrics.evaluate_concept(tiny_ldm, judge, "twotone_square", None, seeds=1, steps=2)
    assert set(report.rates) == {
        "concept_rate", "class_concept_rate", "text_align_rate", "text_align_object_rate",
        "text_align_colour_rate", "text_align_concept_rate",
    }  # fmt: skip
    assert all(0.0 <= v <= 1.0 for v in report.rates.values())
    assert [len(s) for s in report.samples.values()] == [2, 2, 6]
    grid = report.grid()
    assert grid.size == (36, 10 * 34 + 2)  # 10 prompts x 1 seed of 32 px, 2 px padding
    with pytest.raises(ValueError, match="families"):
        metrics.evaluate_concept(tiny_ldm, judge, "twotone_square", None, families=("x",))


def test_callback_writes_metrics_or_skips(tiny_ldm, tmp_path):
    from toyworld.callback import ToyConceptEval

    class Trainer:
        global_rank, global_step, max_steps = 0, 3, 3
        callback_metrics: dict = {}

    cb = ToyConceptEval(tmp_path, [{"name": "twotone_square", "token": None}], seeds=1, steps=2,
                        families=("concept",), require_toy_base=False)  # fmt: skip
    state = torch.random.get_rng_state()
    cb.on_fit_start(Trainer, tiny_ldm)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random stream kept
    cb.on_train_end(Trainer, tiny_ldm)
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert set(out["twotone_square"]) == {"concept_rate", "base_concept_rate"}
    assert out["step"] == 3 and "toy/twotone_square/concept_rate" in Trainer.callback_metrics
    assert (tmp_path / "eval_grid.png").exists()
    (tmp_path / "metrics.json").unlink()
    Trainer.max_steps = 10  # stopped early (cancelled): not evaluated
    cb.on_train_end(Trainer, tiny_ldm)
    assert not (tmp_path / "metrics.json").exists()
    toy = {"base_ckpt": "models/toy/toy_base.safetensors"}
    assert ToyConceptEval(tmp_path, [{"name": "twotone_square"}], **toy).enabled
    assert not ToyConceptEval(tmp_path, [{"name": "twotone_square"}]).enabled  # no base given
    assert not ToyConceptEval(tmp_path, [{"name": "twotone_square"}], base_ckpt="x.ckpt").enabled
    assert not ToyConceptEval(tmp_path, [{"name": "twotone_square"}], resolution=512,
                              **toy).enabled  # fmt: skip
    assert not ToyConceptEval(tmp_path, [{"name": None}], **toy).enabled
    assert not ToyConceptEval(tmp_path, [{"name": "my_dog"}], **toy).enabled


def test_recipes_enable_the_toy_evaluation(tmp_path):
    from hydra.utils import instantiate

    for recipe in ("finetune_toy", "finetune_noreg", "finetune_real", "finetune_gen",
                   "finetune_joint", "finetune_joint_toy", "finetune_face"):  # fmt: skip
        cfg = compose_config(recipe, [], tmp_path)
        cb = instantiate(cfg.callbacks.toy_eval)
        assert cb.enabled and all(c["name"] in CONCEPTS for c in cb.concepts), recipe
        for own in (["prepare=null"], ["model=tiny"], ["resolution=512"]):
            cfg = compose_config(recipe, own, tmp_path)
            assert not instantiate(cfg.callbacks.toy_eval).enabled, (recipe, own)


def test_finetune_toy_pools_both_regularization_sets(tmp_path):
    """The main-job recipe on the tiny model: two steps, generated + captioned class images."""
    from hydra.utils import instantiate

    from main import train

    overrides = [
        "model=tiny", "trainer.max_steps=2", "data.batch_size=2", "logger=null",
        "callbacks.log_samples=null", f"paths.cache_dir={tmp_path / 'cache'}",
        "prepare.class_images.n=2", "prepare.class_images.steps=2",
        "prepare.class_images.batch_size=2", "prepare.real_images.n=3",
    ]  # fmt: skip
    cfg = compose_config("finetune_toy", overrides, tmp_path / "run")
    assert cfg.model._target_ == "custom.model.CustomDiffusion" and cfg.model.mask_margin is None
    assert cfg.model.lr_scheduler.total_iters == 2  # the linear decay ends with the run
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()
    data = instantiate(cfg.data).train_set
    assert len(data.regs) == 5 and len(data) == 10
    assert sum(c == "a photo of a triangle" for _, c in data.regs) >= 2
    assert not (tmp_path / "run" / "metrics.json").exists()  # tiny model: no toy evaluation


def test_finetune_joint_toy_pools_regularization_per_concept(tmp_path):
    """The toy two-concept recipe: each concept's regularization is its own class word's
    generated images pooled with captioned scenes, and it trains with the two-concept rates."""
    from hydra.utils import instantiate

    from main import train

    small = [f"prepare.{k}.{v}" for k in ("gen_images", "gen_images2")
             for v in ("n=2", "steps=2", "batch_size=2")]  # fmt: skip
    overrides = [
        "model=tiny", "trainer.max_steps=2", "data.batch_size=2", "logger=null",
        "callbacks.log_samples=null", f"paths.cache_dir={tmp_path / 'cache'}",
        "prepare.class_images.n=3", "prepare.class_images2.n=3", *small,
    ]  # fmt: skip
    cfg = compose_config("finetune_joint_toy", overrides, tmp_path / "run")
    assert (cfg.model.learning_rate, cfg.model.token_learning_rate) == (2e-5, 2e-4)
    assert cfg.data.train.aug is False and cfg.data.train.flip_p == 0
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()
    data = instantiate(cfg.data).train_set
    for concept, word in zip(data.datasets, ("triangle", "square"), strict=True):
        captions = [c for _, c in concept.regs]
        assert len(captions) == 5, captions
        assert captions.count(f"a photo of a {word}") >= 2, captions
        assert all(word in c for c in captions), captions


@pytest.mark.slow
def test_custom_diffusion_learns_a_toy_concept(tmp_path):
    """A reduced bench/toy_custom.py (about 3 min on a free CPU): finetune_toy with 50 generated
    regularization images and half the steps (its lr decays over them); the token then draws the
    concept far more often than the plain class word does on the base, and the plain class word
    still does not."""
    from custom.delta import apply_delta
    from ldm import load_model
    from main import train

    torch.set_num_threads(1)
    overrides = [
        "trainer.max_steps=1200", "prepare.class_images.n=50", "prepare.real_images.n=50",
        "callbacks.log_samples=null", "callbacks.toy_eval=null", "logger=null",
        f"paths.cache_dir={tmp_path / 'cache'}", "+trainer.enable_progress_bar=false",
    ]  # fmt: skip
    cfg = compose_config("finetune_toy", overrides, tmp_path / "run")
    name = cfg.concept
    train(cfg)
    judge = Judge.load()
    base = metrics.evaluate_concept(load_model(None, "toy"), judge, name, None, 8, ("class",))
    model = load_model(None, "toy")
    apply_delta(model, tmp_path / "run" / "checkpoints" / "last.safetensors")
    tuned = metrics.evaluate_concept(model, judge, name, "<new1>", 8, ("concept", "class"))
    assert tuned.rates["concept_rate"] >= 0.6
    assert tuned.rates["concept_rate"] >= base.rates["class_concept_rate"] + 0.5
    assert tuned.rates["class_concept_rate"] <= 0.25


@pytest.mark.slow
def test_compose_keeps_a_concept_only_with_its_padding_rows(tmp_path):
    """About 4 min on a free CPU: twotone_square trained alone with the two-concept schedule,
    then merged on its own (composenW of one delta). With the reference's rows (up to the end
    token) the merge loses the concept; with 8 padding rows per target prompt it keeps it
    (README "Where a toy concept lives"; measured 0.28-0.375 vs 0.94-0.97 on three seeds)."""
    from custom.compose import compose
    from custom.delta import apply_delta
    from custom.formats import Delta
    from ldm import load_model
    from main import train
    from toyworld.dataset import make_example

    torch.set_num_threads(1)
    overrides = [
        "concept=twotone_square", "class_word=square", "data.train.flip_p=0",
        "data.train.aug=false", "model.learning_rate=2e-5", "model.token_learning_rate=2e-4",
        "model.lr_scheduler=null", "trainer.max_steps=1600", "prepare.class_images.n=50",
        "prepare.real_images.n=50",
        "callbacks.log_samples=null", "callbacks.toy_eval=null", "logger=null",
        f"paths.cache_dir={tmp_path / 'cache'}", "+trainer.enable_progress_bar=false",
    ]  # fmt: skip
    train(compose_config("finetune_toy", overrides, tmp_path / "run"))
    delta = Delta.load(tmp_path / "run" / "checkpoints" / "last.safetensors")
    judge, base = Judge.load(), load_model(None, "toy")
    captions = [make_example(i, seed=7).caption for i in range(200)]
    templates, rates = ["a photo of a {}", "a {}"], {}
    for padding in (0, 8):
        merged, report = compose([delta], base, ["square"], captions, templates=templates,
                                 target_padding=padding)  # fmt: skip
        assert max(report["max_constraint_residual"].values()) < 1e-4
        model = load_model(None, "toy")
        apply_delta(model, (merged.tensors, merged.meta))
        r = metrics.evaluate_concept(model, judge, "twotone_square", "<new1>", 16, ("concept",))
        rates[padding] = r.rates["concept_rate"]
    assert rates[8] >= 0.8 and rates[8] >= rates[0] + 0.3, rates
