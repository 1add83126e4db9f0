"""Placeholder tokens: tokenizer ids, row initialisation, only the new rows learn."""

from __future__ import annotations

import pytest
import torch

from ldm.modules.tokens import (
    PLACEHOLDER_PARAM,
    PlaceholderEmbedding,
    add_placeholder_tokens,
    placeholder_tokens,
)

TOKENS = ["<tok-a>", "<tok-b>"]  # test-only names: real ones come from config
KTN, PLL = 42170, 47629  # the reference's initializer rows ("ktn", "pll")


def test_ids_rows_and_keys(tiny_model):
    enc = tiny_model.cond_stage_model
    table = enc.token_embedding.weight
    before = table.detach().clone()
    ids = add_placeholder_tokens(enc, TOKENS, [[KTN], [PLL, 320]])
    assert ids == [49408, 49409] and placeholder_tokens(enc) == TOKENS
    emb = enc.token_embedding
    assert isinstance(emb, PlaceholderEmbedding) and emb.weight is table
    assert torch.equal(emb.placeholder_weight[0], before[KTN])
    torch.testing.assert_close(emb.placeholder_weight[1], before[[PLL, 320]].mean(0))
    # A prompt with the token reads its row; the rest of the table is untouched.
    tokens = enc.tokenize([f"a photo of a {TOKENS[1]} cat"])[0]
    assert tokens[5].item() == ids[1]
    assert torch.equal(emb(tokens[None])[0, 5], emb.placeholder_weight[1])
    assert torch.equal(emb(tokens[None])[0, 4], before[tokens[4]])
    keys = [k for k in tiny_model.state_dict() if "token_embedding" in k]
    prefix = "cond_stage_model.transformer.text_model.embeddings.token_embedding."
    assert keys == [prefix + "weight", prefix + PLACEHOLDER_PARAM]
    assert tiny_model.state_dict()[prefix + "weight"].shape == (49408, 32)


def test_refuses_existing_and_bad_tokens(tiny_model):
    enc = tiny_model.cond_stage_model
    for existing in ("cat", "ktn", "<|endoftext|>"):
        with pytest.raises(ValueError, match="already exists in the vocabulary"):
            add_placeholder_tokens(enc, [existing], [[KTN]])
    add_placeholder_tokens(enc, TOKENS[:1], [[KTN]])
    with pytest.raises(ValueError, match="already exists") as err:
        add_placeholder_tokens(enc, TOKENS[:1], [[KTN]])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="repeat"):
        add_placeholder_tokens(enc, [TOKENS[1], TOKENS[1]], [[KTN], [KTN]])
    with pytest.raises(ValueError, match="initializer id lists"):
        add_placeholder_tokens(enc, TOKENS[1:], [[KTN], [PLL]])
    with pytest.raises(ValueError, match="base vocabulary ids"):
        add_placeholder_tokens(enc, TOKENS[1:], [[49408]])
    with pytest.raises(ValueError, match="without spaces"):
        add_placeholder_tokens(enc, ["two words"], [[KTN]])
    assert placeholder_tokens(enc) == TOKENS[:1]


def test_adding_more_tokens_appends_rows(tiny_model):
    enc = tiny_model.cond_stage_model
    add_placeholder_tokens(enc, TOKENS[:1], [KTN])
    first = enc.token_embedding.placeholder_weight.detach().clone()
    assert add_placeholder_tokens(enc, TOKENS[1:], [PLL]) == [49409]
    rows = enc.token_embedding.placeholder_weight
    assert rows.shape == (2, 32) and torch.equal(rows[:1], first)


def test_only_new_rows_get_gradient(tiny_model):
    enc = tiny_model.cond_stage_model
    add_placeholder_tokens(enc, TOKENS, [[KTN], [PLL]])
    emb = enc.token_embedding
    assert not emb.weight.requires_grad and emb.placeholder_weight.requires_grad
    out = enc([f"a photo of a {TOKENS[0]} cat", "a photo of a dog"])
    out.square().mean().backward()
    grad = emb.placeholder_weight.grad
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert emb.weight.grad is None
    # Without placeholders in the batch the rows take part with a zero gradient (DDP-safe).
    emb.placeholder_weight.grad = None
    enc(["a photo of a dog"]).square().mean().backward()
    assert torch.equal(emb.placeholder_weight.grad, torch.zeros(2, 32))


def test_trainable_text_encoder_keeps_base_table_trainable():
    from ldm import build_model

    model = build_model("tiny", cond_stage_trainable=True)
    enc = model.cond_stage_model
    add_placeholder_tokens(enc, TOKENS[:1], [[KTN]])
    enc([f"a {TOKENS[0]} and a cat"]).sum().backward()
    assert enc.token_embedding.weight.grad is not None
    assert enc.token_embedding.placeholder_weight.grad.abs().sum() > 0
