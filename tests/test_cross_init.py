"""Cross Initialization: the init rule (computed independently), the L2 tie, the trainable set,
CD + CR, embedding files (ours, the reference's, diffusers'), face data, recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cross_init.embeddings import apply_embeddings, load_embeddings, save_embeddings
from cross_init.init import CELEB_NAMES, load_names
from ldm import build_model
from tests.conftest import ROOT, compose_config
from tests.test_custom import pretrained_like

TOKENS = ["<ci-a>", "<ci-b>"]  # test-only names: real ones come from config
ROWS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.placeholder_weight"
NAMES = ["red circle", "blue", "green square", "red circle", "purple triangle ring"]


def crossinit(names=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("placeholder_tokens", TOKENS)
    model = build_model("tiny", _target_="cross_init.model.CrossInit", names=names, **kwargs)
    return pretrained_like(model, seed)


def reference_init(embedder, names, n):
    """The reference rule written out with plain transformers calls (no project code): mean
    input rows per position, then the text model on ``inputs_embeds`` with its causal mask and
    final LayerNorm, outputs at positions 1..n."""
    from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

    tok = embedder.tokenizer
    text = embedder.transformer.text_model
    table = text.embeddings.token_embedding.weight.detach()[: tok.vocab_size]
    columns = [[] for _ in range(n)]
    for name in names:
        ids = tok(name).input_ids[1:-1]  # drop start and end tokens
        for k, i in enumerate(ids[:n]):
            columns[k].append(table[i])
    mu = torch.stack([torch.stack(c).mean(0) for c in columns])
    rows = [table[tok.bos_token_id], *mu, table[tok.eos_token_id]]
    rows += [table[tok.pad_token_id]] * (embedder.max_length - len(rows))
    with torch.no_grad():
        h = text.embeddings(inputs_embeds=torch.stack(rows)[None])
        mask = _create_4d_causal_attention_mask((1, h.shape[1]), h.dtype, h.device)
        h = text.encoder(inputs_embeds=h, causal_attention_mask=mask).last_hidden_state
        out = text.final_layer_norm(h)
    return out[0, 1 : 1 + n]


@pytest.mark.parametrize("source", ["small", "celeb"])
def test_initial_embedding_is_the_reference_rule(tmp_path, source):
    if source == "small":
        path = tmp_path / "names.txt"
        path.write_text("\n".join(NAMES) + "\n\n")
        names = NAMES
    else:
        path, names = None, load_names()
    model = crossinit(names=path)
    rows = model.state_dict()[ROWS]
    want = reference_init(model.cond_stage_model, names, len(TOKENS))
    assert rows.shape == want.shape == (2, 32)
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.cross_init.initial, want, rtol=1e-5, atol=1e-5)
    # An output vector, not an input row: of the encoder's output scale (final LayerNorm).
    table = model.cond_stage_model.token_embedding.weight
    assert rows.norm(dim=1).min() > 5 * table.norm(dim=1).mean()


def test_shipped_celebrity_list():
    names = load_names()
    assert len(names) == 691 and len(set(names)) == 646  # repeats are kept, as the reference
    assert names[0] == "Adam Sandler" and "Beyoncé" in names
    assert (CELEB_NAMES.parent / "NAMES_LICENSE.md").exists()


def test_one_token_names_count_in_the_first_column_only(tmp_path):
    from cross_init.init import mean_name_embeddings

    model = crossinit()
    emb = model.cond_stage_model
    table = emb.token_embedding.weight.detach()
    tok = emb.tokenizer
    ids = {w: tok(w, add_special_tokens=False).input_ids[0] for w in ("red", "blue", "circle")}
    mu = mean_name_embeddings(emb, ["red circle", "blue"], 2)
    torch.testing.assert_close(mu[0], (table[ids["red"]] + table[ids["blue"]]) / 2)
    torch.testing.assert_close(mu[1], table[ids["circle"]])
    with pytest.raises(ValueError, match="position"):
        mean_name_embeddings(emb, ["blue", "red"], 2)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no names"):
        load_names(tmp_path / "empty.txt")


def test_other_inits_and_bad_arguments():
    words = crossinit(init="words", init_words=["red", "circle"])
    table = words.cond_stage_model.token_embedding.weight
    red = words.cond_stage_model.tokenizer("red", add_special_tokens=False).input_ids[0]
    assert torch.equal(words.state_dict()[ROWS][0], table[red])
    rand = crossinit(init="random", init_seed=3)
    assert not torch.equal(rand.state_dict()[ROWS], crossinit(init="random").state_dict()[ROWS])
    with pytest.raises(ValueError, match="init must be one of"):
        crossinit(init="mean")
    with pytest.raises(ValueError, match="one init word per token"):
        crossinit(init="words", init_words=["red"])
    with pytest.raises(ValueError, match="at least one"):
        crossinit(placeholder_tokens=[])


def batch(n=2, tokens=TOKENS):
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(n, 32, 32, 3, generator=g) * 2 - 1,
        "caption": [f"a photo of a face of {' '.join(tokens)} person"] * n,
    }


def test_only_the_token_rows_learn_and_the_l2_tie():
    model = crossinit(reg_weight=0.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {ROWS}
    assert model.trainable_parameters() == [model.token_rows()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v0 = model.cross_init.initial.clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        loss, logs = model.shared_step(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {ROWS}
    assert torch.equal(model.cross_init.initial, v0)  # v0 stays fixed
    v = after[ROWS]
    want = 0.5 * torch.linalg.vector_norm(v - v0 + 1e-6, dim=1).mean()
    got = model.extra_losses({}, {})["loss_reg"]
    torch.testing.assert_close(got, want)
    assert float(got.detach()) > 0 and set(logs) >= {"loss", "loss_simple", "loss_reg"}
    # The base's state-dict keys are unchanged apart from the new rows (v0 is not saved).
    assert set(after) == set(build_model("tiny").state_dict()) | {ROWS}


def test_cd_cr_trains_kv_and_tokens_at_their_own_rates():
    torch.manual_seed(0)
    model = build_model("tiny", _target_="cross_init.model.CustomDiffusionCrossInit",
                        placeholder_tokens=TOKENS, learning_rate=2e-5,
                        token_learning_rate=3e-3)  # fmt: skip
    pretrained_like(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kv = {n for n in trainable if n != ROWS}
    assert ROWS in trainable and len(kv) == 14
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in kv)
    groups = model.param_groups()  # scale_lr off: the base rates
    assert [g["lr"] for g in groups] == [2e-5, 3e-3]
    assert groups[1]["params"] == [model.cond_stage_model.token_embedding.placeholder_weight]
    assert len(groups[0]["params"]) == 14
    torch.testing.assert_close(model.state_dict()[ROWS], crossinit().state_dict()[ROWS])
    loss, logs = model.shared_step(batch())
    assert torch.isfinite(loss) and "loss_reg" in logs
    meta = model.export_metadata()
    assert meta["method"] == "custom_diffusion_cross_init" and json.loads(meta["tokens"]) == TOKENS
    assert set(model.export_state_dict()) == trainable


def test_embedding_files_round_trip_and_reference_format(tmp_path):
    model = crossinit()
    rows = model.cross_init.learned_embeddings(model.cond_stage_model)
    paths = save_embeddings(rows, tmp_path / "emb")
    names = [p.relative_to(tmp_path / "emb").as_posix() for p in paths]
    assert names == ["learned_embeds.bin", "learned_embeds.safetensors",
                     "textual_inversion/0_ci-a.safetensors",
                     "textual_inversion/1_ci-b.safetensors"]  # fmt: skip
    ref = torch.load(paths[0], weights_only=True)  # the reference's {token: (D,)}
    assert list(ref) == TOKENS and all(v.shape == (32,) for v in ref.values())
    for source in (paths[0], paths[1], tmp_path / "emb", tmp_path / "emb" / "textual_inversion"):
        got = load_embeddings(source)
        assert list(got) == TOKENS
        assert all(torch.equal(got[t], rows[t]) for t in TOKENS)
    torch.manual_seed(0)
    fresh = build_model("tiny")  # the same base text encoder, without the tokens
    assert apply_embeddings(fresh, tmp_path / "emb") == TOKENS
    prompt = [f"a photo of {' '.join(TOKENS)} person"]
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.get_learned_conditioning(prompt), model.get_learned_conditioning(prompt)
        )
    bad = {TOKENS[0]: torch.zeros(768)}
    with pytest.raises(ValueError, match="another base"):
        apply_embeddings(build_model("tiny"), bad)
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / "missing")


def test_sample_with_embeddings_alone_and_with_a_cd_delta(tmp_path):
    import sample
    from custom.delta import save_delta
    from tests.test_custom import custom_model

    model = crossinit()
    save_embeddings(model.cross_init.learned_embeddings(model.cond_stage_model), tmp_path / "e")
    delta = save_delta(custom_model(), tmp_path / "delta.safetensors")  # token <tok-a>
    fast = ["model=tiny", "model.ckpt=null", "n_samples=1", "sampler.steps=2"]
    prompt = f"prompt='a photo of {' '.join(TOKENS)} person'"
    for i, extra in enumerate([[], [f"delta={delta}", "force_delta=true"]]):
        cfg = compose_config("sample", [*fast, prompt, f"embeddings={tmp_path / 'e'}", *extra],
                             tmp_path / f"s{i}")  # fmt: skip
        assert len(sample.run(cfg)) == 1
    cfg = compose_config("sample", [*fast, f"embeddings={tmp_path / 'nope'}"], tmp_path / "s3")
    with pytest.raises(SystemExit, match="error"):
        sample.run(cfg)


def test_face_images_crop_flip_captions(tmp_path):
    from data.face import FaceImages, square_around

    img = np.zeros((60, 100, 3), np.uint8)
    img[10:30, 70:90] = 255  # the "face": a white 20x20 square at x 70..90, y 10..30
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({"box": [70, 10, 90, 30]}))
    ds = FaceImages(tmp_path, ["v1*", "v2*"], size=16, flip_p=0.0, repeat=3, margin=1.0, seed=0)
    assert len(ds) == 3
    item = ds[0]
    assert item["image"].shape == (16, 16, 3) and float(item["image"].min()) > 0.9  # all face
    assert "face of v1* v2* person" in item["caption"]
    assert square_around([70, 10, 90, 30], 100, 60, 4.0) == (40, 0, 100, 60)  # moved inside
    Image.fromarray(img).save(tmp_path / "b.png")  # no box: the centred square
    plain = FaceImages(tmp_path, ["v*"], size=60, flip_p=1.0, repeat=1, seed=0)
    flipped = plain[1]["image"].numpy()
    expected = np.asarray(Image.fromarray(img[:, 20:80]).transpose(Image.FLIP_LEFT_RIGHT))
    np.testing.assert_allclose(flipped, expected / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="bad face box"):
        square_around([5, 5, 5, 9], 10, 10, 1.0)


@pytest.mark.parametrize("name", ["finetune_crossinit", "finetune_cd_cr"])
def test_face_recipes_train_on_the_shipped_faces(name, tmp_path):
    from main import train

    cfg = compose_config(name, ["model=tiny", "trainer.max_steps=2", "data.batch_size=2",
                                "callbacks.log_samples=null", "logger=null",
                                "callbacks.save_embeddings.every_n_steps=1"], tmp_path)  # fmt: skip
    assert cfg.data.train.root.endswith("cross_init/faces/28017")
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and "train/loss_reg" in metrics
    emb = tmp_path / "embeddings"
    assert (emb / "learned_embeds-steps-1.bin").exists() and (emb / "learned_embeds.bin").exists()
    assert len(list((emb / "textual_inversion").glob("*.safetensors"))) == 2
    assert list(load_embeddings(tmp_path / "checkpoints" / "last.safetensors")) == ["v1*", "v2*"]


def test_diffusers_load_textual_inversion_reads_our_files(tmp_path):
    """diffusers' own ``load_textual_inversion`` takes our per-token files and then encodes
    prompts (and draws images) exactly as our model with the same embeddings does."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm import resolve_model_config
    from ldm.convert import write_diffusers
    from ldm.generate import generate, initial_noise

    base = crossinit().eval()  # its base weights: the tiny model's, with trained-like UNet
    model = crossinit().eval()
    with torch.no_grad():
        model.token_rows().add_(torch.randn_like(model.token_rows()))  # "trained" rows
    rows = model.cross_init.learned_embeddings(model.cond_stage_model)
    save_embeddings(rows, tmp_path / "emb")
    sd = {k: v for k, v in base.state_dict().items() if k != ROWS}
    write_diffusers(sd, resolve_model_config("tiny"), tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    files = sorted((tmp_path / "emb" / "textual_inversion").glob("*.safetensors"))
    pipe.load_textual_inversion([str(f) for f in files])
    prompt = f"a photo of a face of {' '.join(TOKENS)} person"
    ids = pipe.tokenizer(prompt).input_ids
    assert ids == model.cond_stage_model.tokenizer(prompt).input_ids
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        ours = model.get_learned_conditioning([prompt])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    x_T = initial_noise((4, 8, 8), [3], "cpu", torch.float32)
    out = pipe(prompt, latents=x_T, num_inference_steps=3, guidance_scale=5.0, eta=0.0,
               height=32, width=32, output_type="np").images  # fmt: skip
    theirs = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2)
    mine = generate(model, [prompt], steps=3, guidance_scale=5.0, eta=0.0, seed=3, progress=False)
    assert float((theirs - mine).abs().max()) < 1e-4


def test_recipes_compose_with_their_tokens(tmp_path):
    for name in ("finetune_crossinit", "finetune_cd_cr"):
        cfg = compose_config(name, [], tmp_path)
        assert list(cfg.data.train.tokens) == list(cfg.model.placeholder_tokens) == ["v1*", "v2*"]
        assert cfg.model.learning_rate > 0 and cfg.trainer.max_steps == 320
    assert (ROOT / "cross_init" / "faces" / "README.md").exists()


@pytest.mark.slow
def test_toy_bench_reduced(tmp_path):
    """A reduced ``bench/toy_crossinit.py``: on the toy base, textual inversion learns the toy
    concept within 50 steps, and the Cross-Init run starts from the toy names' output vectors
    (the encoder's output scale, far above the input rows the trained tokens end near)."""
    import subprocess
    import sys

    cmd = [sys.executable, "bench/toy_crossinit.py", "--runs", "cross,baseline", "--baseline",
           "random", "--steps", "50", "--seeds", "8", "--sample-steps", "15", "--workdir",
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("steps_to_fidelity_cross", "steps_to_fidelity_baseline", "target_fidelity"):
        assert key in out
    curves = out["curves"]
    assert [s for s, _ in curves["cross"]] == [0, 10, 25, 50]
    assert curves["baseline"][0][1] == 0.0  # the concept is novel: absent before training
    assert out["target_fidelity"] >= 0.5 and out["steps_to_fidelity_baseline"] <= 50
    norms = out["token_norms"]
    assert min(norms["cross"]["init"]) > 10 * max(norms["baseline"]["final"])
