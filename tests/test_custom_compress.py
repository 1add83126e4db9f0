"""Compressed deltas: the reference's singular-value rule, the size, exact reconstruction on
the base they were made against (and refusal elsewhere), sampling through ``sample.py``."""

from __future__ import annotations

import json

import pytest
import torch

from custom.compress import (
    SVD_U,
    SVD_V,
    compress,
    energy_rank,
    expand,
    low_rank,
    nbytes,
)
from custom.delta import DeltaMismatchError, apply_delta, load_delta, save_delta
from custom.formats import ROWS, Delta
from ldm.checkpoint import save_state_dict
from tests.conftest import compose_config
from tests.test_custom import INIT_IDS, TOKENS, custom_model, outputs, tiny_base, train_steps

PROMPT = f"a photo of a {TOKENS[0]} triangle"


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    path = tmp_path_factory.mktemp("compress") / "delta.safetensors"
    trained = train_steps(custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS), 3)
    return Delta.load(save_delta(trained, path))


@pytest.mark.parametrize(
    ("s", "ratio", "rank"),
    [
        ([5.0, 3.0, 1.0, 1.0], 0.6, 1),  # fractions .5 .8 .9 1: index 1 crosses, keep 1
        ([1.0] * 5, 0.6, 3),  # .2 .4 .6 (not > .6) .8: index 3 crosses
        ([1.0] * 5, 0.5, 2),
        ([10.0, 1.0], 0.6, 1),  # s_0 alone crosses: the reference keeps 0, we keep 1
        ([4.0, 3.0, 2.0, 1.0], 1.0, 4),
        ([0.0, 0.0], 0.6, 1),
    ],
)
def test_energy_rule_is_the_reference_one(s, ratio, rank):
    assert energy_rank(torch.tensor(s), ratio) == rank


def test_low_rank_is_the_svd_truncation():
    torch.manual_seed(0)
    diff = torch.randn(48, 32) @ torch.diag(torch.logspace(0, -3, 32)) @ torch.randn(32, 32)
    s = torch.linalg.svdvals(diff.double())
    u, v = low_rank(diff)
    r = energy_rank(s)
    assert u.shape == (48, r) and v.shape == (r, 32)
    # Eckart-Young: the error is exactly the dropped singular values.
    err = float(torch.linalg.matrix_norm((diff - u @ v).double()))
    assert err == pytest.approx(float(s[r:].norm()), rel=1e-4)
    u, v = low_rank(diff, rank=100)
    assert u.shape[1] == 32 and torch.allclose(u @ v, diff, atol=1e-5)


def test_compress_size_ranks_and_reconstruction(delta):
    base = tiny_base(0).eval()
    own = base.state_dict()
    tensors, meta = compress(delta.tensors, delta.meta, own)
    ranks = json.loads(meta["ranks"])
    assert meta["compression"] == "svd" and meta["compression_ratio"] == "0.6"
    assert set(ranks) == {k for k in delta.tensors if k != ROWS}
    expected = 0
    for key, r in ranks.items():
        diff = (delta.tensors[key] - own[key]).double()
        assert r == energy_rank(torch.linalg.svdvals(diff))
        assert tensors[key + SVD_U].shape == (diff.shape[0], r)
        assert tensors[key + SVD_V].shape == (r, diff.shape[1])
        expected += r * sum(diff.shape) * 4
    assert torch.equal(tensors[ROWS], delta.tensors[ROWS])
    assert nbytes(tensors) == expected + nbytes({ROWS: delta.tensors[ROWS]})
    assert nbytes(tensors) < 0.5 * nbytes(delta.tensors)
    # full rank: lossless up to float rounding; applied transparently by apply_delta
    tensors, meta = compress(delta.tensors, delta.meta, own, rank=64)
    assert meta["compression_rank"] == "64" and "compression_ratio" not in meta
    full = expand(tensors, meta, own)
    assert all(torch.allclose(full[k], delta.tensors[k], atol=1e-5) for k in delta.tensors)
    apply_delta(base, (tensors, meta))
    reference = tiny_base(0).eval()
    apply_delta(reference, (delta.tensors, delta.meta))
    for got, want in zip(outputs(base, PROMPT), outputs(reference, PROMPT), strict=True):
        assert torch.allclose(got, want, atol=1e-4)


def test_compressed_delta_is_checked_against_its_base(delta):
    own = tiny_base(0).state_dict()
    tensors, meta = compress(delta.tensors, delta.meta, own)
    with pytest.raises(ValueError, match="already compressed"):
        compress(tensors, meta, own)
    model = tiny_base(0).eval()
    apply_delta(model, (tensors, meta))
    with pytest.raises(DeltaMismatchError, match="delta already applied") as err:
        apply_delta(model, (tensors, meta))  # W0 is no longer the base's
    assert "\n" not in str(err.value)
    with pytest.raises(DeltaMismatchError, match="trained on base"):
        apply_delta(tiny_base(1).eval(), (tensors, meta))


def test_cli_compress_and_sample_from_compressed_delta(delta, tmp_path, capsys):
    import sample
    from custom.__main__ import main

    base = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    src, out = tmp_path / "delta.safetensors", tmp_path / "small.safetensors"
    delta.save(src)
    common = ["--base", str(base), "--config", "tiny", "-o", str(out)]
    assert main(["compress", str(src), *common]) == 0
    printed = capsys.readouterr().out
    assert "of the full delta" in printed and "ranks" in printed
    tensors, meta = load_delta(out)
    assert any(k.endswith(SVD_U) for k in tensors)
    assert main(["compress", str(src), *common, "--rank", "2", "--overwrite"]) == 0
    assert set(json.loads(load_delta(out)[1]["ranks"]).values()) == {2}
    assert main(["compress", str(src), *common]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err

    args = ["model=tiny", "model.ckpt=null", f"ckpt={base}", "n_samples=1", "sampler.steps=2",
            f"prompt='{PROMPT}'", "guidance_scale=1.0"]  # fmt: skip
    image = {}
    for name, path in (("full", src), ("compressed", out)):
        run = compose_config("sample", [*args, f"delta={path}"], tmp_path / name)
        image[name] = sample.run(run)[0]
    assert image["compressed"].exists() and image["full"].exists()
