"""Closed-form merging (composenW): the solver meets its constraints and is optimal; merging two
tiny deltas keeps each concept's target outputs and reports the residuals."""

from __future__ import annotations

import json

import pytest
import torch

from custom.compose import compose, feature_start, solve, target_prompts, unique_rows
from custom.delta import apply_delta, load_delta, save_delta
from custom.formats import Delta
from ldm.checkpoint import save_state_dict
from tests.test_custom import INIT_IDS, TOKENS, custom_model, tiny_base, train_steps

CAPTIONS = [f"a photo of a {a} {b} on the {c}" for a in ("red", "small", "old")
            for b in ("dog", "car", "house", "tree") for c in ("grass", "beach")]  # fmt: skip


def random_problem(seed=0, d=24, dim=16, n=60, m=5, hyperplane=False):
    g = torch.Generator().manual_seed(seed)
    c_reg, c_tgt = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
    if hyperplane:  # LayerNorm-like features: zero mean, so G is singular
        c_reg, c_tgt = c_reg - c_reg.mean(1, keepdim=True), c_tgt - c_tgt.mean(1, keepdim=True)
    w0, v_tgt = torch.randn(d, dim, generator=g), torch.randn(m, d, generator=g)
    return w0, c_reg, c_tgt, v_tgt


@pytest.mark.parametrize("hyperplane", [False, True])
def test_solution_meets_constraints_and_is_optimal(hyperplane):
    w0, c_reg, c_tgt, v_tgt = random_problem(hyperplane=hyperplane)
    w = solve(w0, c_reg, c_tgt, v_tgt)
    assert float((c_tgt.double() @ w.T - v_tgt).norm() / v_tgt.norm()) < 1e-10
    # KKT: the objective's gradient (W - W0) G lies in the row space of C_tgt ...
    grad = (w - w0.double()) @ (c_reg.T @ c_reg).double()
    q, _ = torch.linalg.qr(c_tgt.double().T)
    assert float((grad - grad @ q @ q.T).norm() / grad.norm()) < 1e-6
    # ... so no feasible direction improves it.
    objective = lambda x: float((c_reg.double() @ (x - w0.double()).T).norm())  # noqa: E731
    null = torch.eye(c_tgt.shape[1], dtype=torch.float64) - q @ q.T
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        step = torch.randn(w.shape, generator=g, dtype=torch.float64) @ null
        assert objective(w + 1e-3 * step) >= objective(w)


def test_unique_rows_and_prompt_rules():
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0 + 1e-9], [5.0, 6.0]])
    kept, owners = unique_rows(rows, ["a", "a", "b", "b"])
    assert kept.shape == (3, 2) and owners == ["a", "a", "b"]
    assert target_prompts("<x>", "cat") == ["<x> cat", "a photo of <x> cat"]
    assert target_prompts("<x>", "pop art")[1] == "painting in the style of <x> pop art"
    assert target_prompts("<x>", "cart")[1] == "a photo of <x> cart"
    assert target_prompts("<x>", "cat", ["a photo of a {}", "a {}"]) == [
        "a photo of a <x> cat",
        "a <x> cat",
    ]
    assert feature_start("photo of a dog") == 4 and feature_start("a dog") == 1


@pytest.fixture(scope="module")
def two_deltas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    paths = []
    for i in range(2):
        model = custom_model(modifier_tokens=TOKENS[i : i + 1], initializer_ids=INIT_IDS[i : i + 1])
        paths.append(save_delta(train_steps(model, 3), tmp / f"d{i}.safetensors"))
    return paths


def test_merge_keeps_each_concepts_targets(two_deltas):
    base = tiny_base(0).eval()
    deltas = [Delta.load(p) for p in two_deltas]
    merged, report = compose(deltas, base, ["triangle", "circle"], CAPTIONS)
    assert merged.tokens == TOKENS and report["n_reg_captions"] == len(CAPTIONS)
    assert max(report["max_constraint_residual"].values()) < 1e-5
    # "a photo of" is shared: kept for the first concept, so only the second one misses some
    # of its targets.
    assert report["max_target_residual"][TOKENS[0]] < 1e-5
    assert report["max_target_residual"][TOKENS[1]] > 1e-3
    assert len(report["layers"]) == 14
    model = tiny_base(0).eval()
    apply_delta(model, (merged.tensors, merged.meta))
    # Each concept's words map through the merged K/V as through its own fine-tuned model.
    for i, path in enumerate(two_deltas):
        own = tiny_base(0).eval()
        apply_delta(own, path)
        emb = model.cond_stage_model
        ids = emb.tokenize([f"{TOKENS[i]} {['triangle', 'circle'][i]}"])
        c = emb.encode_ids(ids)[0, 1:4].detach()  # token, category word, end token
        key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        got = c @ model.state_dict()[key].T
        want = c @ own.state_dict()[key].T
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_target_padding_constrains_positions_after_the_end_token(two_deltas):
    base = tiny_base(0).eval()
    deltas = [Delta.load(p) for p in two_deltas]
    plain = compose(deltas, base, ["triangle", "circle"], CAPTIONS)[1]
    merged, report = compose(deltas, base, ["triangle", "circle"], CAPTIONS, target_padding=2)
    assert report["target_padding"] == 2 and plain["target_padding"] == 0
    assert report["n_target_rows"] == plain["n_target_rows"] + 2 * 2 * 2  # concepts x prompts
    assert report["max_target_residual"][TOKENS[0]] < 1e-5
    model = tiny_base(0).eval()
    apply_delta(model, (merged.tensors, merged.meta))
    own = tiny_base(0).eval()
    apply_delta(own, two_deltas[0])
    emb = model.cond_stage_model
    c = emb.encode_ids(emb.tokenize([f"{TOKENS[0]} triangle"]))[0].detach()
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    w, w_own = model.state_dict()[key], own.state_dict()[key]
    # positions 4-5 (the two after the end token) are met now, position 6 is not constrained
    assert torch.allclose(c[4:6] @ w.T, c[4:6] @ w_own.T, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c[6] @ w.T, c[6] @ w_own.T, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="target_padding"):
        compose(deltas, base, ["triangle", "circle"], CAPTIONS, target_padding=-1)


def test_cli_compose_writes_delta_and_report(two_deltas, tmp_path, capsys):
    from custom.__main__ import main

    base = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "merged.safetensors"
    args = ["compose", *map(str, two_deltas), "--categories", "triangle+circle",
            "--reg-captions", str(captions), "--base", str(base), "--config", "tiny"]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max relative residual" in printed and TOKENS[1] in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["max_constraint_residual"]) == set(TOKENS)
    _, meta = load_delta(out)
    assert json.loads(meta["tokens"]) == TOKENS and json.loads(meta["composed_from"])
    # Own target prompts: constrained exactly, and recorded in the report.
    out2 = tmp_path / "merged2.safetensors"
    assert main([*args, "-o", str(out2), "--templates", "a photo of a {}", "a {}"]) == 0
    report = json.loads(out2.with_suffix(".json").read_text())
    assert report["target_prompts"][TOKENS[0]] == [f"a photo of a {TOKENS[0]} triangle",
                                                   f"a {TOKENS[0]} triangle"]  # fmt: skip
    assert max(report["max_constraint_residual"].values()) < 1e-5
    # errors are one line each
    renamed = ["--tokens", "<r1>", "<r2>", "-o", str(tmp_path / "r.safetensors")]
    assert main([*args, *renamed]) == 0
    assert json.loads(load_delta(tmp_path / "r.safetensors")[1]["tokens"]) == ["<r1>", "<r2>"]
    capsys.readouterr()
    same = ["compose", str(two_deltas[0]), str(two_deltas[0]), "--categories", "a+b",
            "--reg-captions", str(captions), "--base", str(base), "--config", "tiny"]  # fmt: skip
    assert main([*same, "-o", str(tmp_path / "x.safetensors")]) == 1
    assert main([*args, "--categories", "a", "-o", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "repeat" in err[0] and "categories" in err[1], err
