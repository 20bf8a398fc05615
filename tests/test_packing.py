"""Padding-free SFT and RM batches (data.packing): several examples per row, position ids
restarting per example; the loss and the gradients equal the padded batch's."""

import pytest
import torch
from conftest import copy_rows, preference_rows, write_jsonl

from rlhfkit.config import DataConfig, ModelConfig
from rlhfkit.data.build import load_preferences, load_sft
from rlhfkit.data.tokenize import pack_rows, packed_batch
from rlhfkit.models import (
    LabelledLogprobs,
    PromptSharingScorer,
    load_policy,
    load_scalar_model,
    load_tokenizer,
)
from rlhfkit.stages.rm import collate_ranked, rm_loss
from rlhfkit.stages.sft import collate_sft, sft_loss


def test_pack_rows_first_fit_in_order():
    assert pack_rows([5, 4, 3, 6, 2], 9) == [[0, 1], [2, 3], [4]]
    assert pack_rows([12, 3], 9) == [[0], [1]]  # too long for any row: a row of its own
    b = packed_batch([[7, 8, 9], [5, 6], [4] * 6], 6, 0, [[-100, 8, 9], [5, 6], [4] * 6])
    assert b["input_ids"].tolist() == [[7, 8, 9, 5, 6, 0], [4] * 6]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], list(range(6))]
    # no target across a boundary: each sequence's first token is predicted by nothing
    assert b["labels"].tolist() == [[-100, 8, 9, -100, 6, -100], [-100] + [4] * 5]
    assert b["ends"].tolist() == [[0, 2], [0, 4], [1, 5]]


def _grads(module, loss_fn):
    module.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }


def _same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        # fp32 sums in another grouping (the RM's padded path forwards each prompt once and
        # reuses its KV cache): 3e-7 measured on 3 of 672 embedding entries
        torch.testing.assert_close(
            a[1][k], b[1][k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.mark.cpu_isa
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_sft_batch_equals_the_padded_one(tmp_path, tiny_lm, train_on_prompt):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(12, seed=4))
    items, _ = load_sft(str(data), tok, DataConfig(train_on_prompt=train_on_prompt))
    model = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok)
    fwd = LabelledLogprobs(model)
    padded, packed = collate_sft(items, tok.pad_token_id), collate_sft(items, tok.pad_token_id, 32)
    assert packed["input_ids"].shape[0] < len(items)  # several examples share a row
    assert (packed["input_ids"] == tok.pad_token_id).sum() < (
        padded["input_ids"] == tok.pad_token_id
    ).sum()
    _same(
        _grads(model, lambda: sft_loss(fwd, padded)[0]),
        _grads(model, lambda: sft_loss(fwd, packed)[0]),
    )


@pytest.mark.cpu_isa
def test_packed_rm_batch_equals_the_padded_one(tmp_path, tiny_lm):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(10, seed=2))
    items, _ = load_preferences(str(data), tok, DataConfig())
    torch.manual_seed(0)
    model = load_scalar_model(
        ModelConfig(name_or_path=str(tiny_lm)), tok, str(tiny_lm), fresh_head=True
    )
    scorer = PromptSharingScorer(model)
    padded, packed = (
        collate_ranked(items, tok.pad_token_id),
        collate_ranked(items, tok.pad_token_id, 40),
    )
    assert packed["response_ids"].shape[0] < 2 * len(items)
    _same(
        _grads(model, lambda: rm_loss(scorer, padded, True)[0]),
        _grads(model, lambda: rm_loss(scorer, packed, True)[0]),
    )
