"""Sampling: top-k/top-p filters, inverse-CDF sampling, and the KV-cache loop against HF generate."""

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import pad_left
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.sampling import filter_logits, generate, sample_from_logits


def test_top_k_and_top_p_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, False, True, False]]
    # top_p = 0.8: 0.5 + 0.3 reaches 0.8, so 0.15 and 0.05 go
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False]]
    # top_p = 0.81 needs the third token too
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [
        [True, False, False, False]
    ]


def test_inverse_cdf_sampling_matches_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    g = torch.Generator().manual_seed(0)
    n = 200_000
    draws = sample_from_logits(probs.log().expand(n, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[2] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.005)  # > 4 standard errors


@pytest.fixture(scope="module")
def policy(tiny_lm):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    return tok, load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok, trainable=False)


def test_greedy_kv_cache_loop_equals_hf_generate_with_left_padding(policy):
    tok, model = policy
    prompts = [tok("copy : red blue :")["input_ids"], tok("say gold")["input_ids"]]
    ids, mask = pad_left(prompts, tok.pad_token_id)
    ours = generate(
        model, ids, mask, max_new_tokens=6, eos_id=None, pad_id=tok.pad_token_id, top_k=1
    )
    ref = model.generate(  # transformers' own loop as the reference
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    assert torch.equal(ours.tokens, ref[:, ids.shape[1] :])
    assert ours.lengths.tolist() == [6, 6] and not ours.stopped.any()


def test_stops_at_eos_and_stop_sequences_and_pads_after(policy):
    tok, model = policy
    ids, mask = pad_left([tok("copy : red :")["input_ids"]] * 64, tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=12,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=3.0,
        generator=g,
    )  # hot sampling so some rows hit EOS
    for row, n, stopped in zip(out.tokens, out.lengths, out.stopped, strict=True):
        n = int(n)
        if stopped:
            assert row[n - 1] == tok.eos_token_id and (row[: n - 1] != tok.eos_token_id).all()
        else:
            assert n == 12 and (row != tok.eos_token_id).all()
        assert (row[n:] == tok.pad_token_id).all()
    assert out.stopped.any() and (~out.stopped).any()
    red = tok.convert_tokens_to_ids("red")
    out = generate(
        model,
        ids[:8],
        mask[:8],
        max_new_tokens=12,
        eos_id=None,
        pad_id=tok.pad_token_id,
        temperature=3.0,
        stop_sequences=[[red]],
        generator=g,
    )
    for row, n, stopped in zip(out.tokens, out.lengths, out.stopped, strict=True):
        assert not stopped or row[int(n) - 1] == red


@pytest.mark.slow
def test_compiled_static_cache_decoding_equals_the_eager_loop(policy):
    """rollout.compile: torch.compile'd decode step over a StaticCache against the plain eager
    loop: the same samples (same generator), logprobs and entropy within fp32 rounding, stops at
    EOS included; a second call with another prompt width in the same bucket reuses the graph."""
    tok, model = policy
    texts = ["copy : red blue :", "say gold", "copy : green :"]
    ids, mask = pad_left([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    runs = {}
    for compiled in (False, True):
        runs[compiled] = generate(
            model,
            ids,
            mask,
            max_new_tokens=12,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=0.8,
            generator=torch.Generator().manual_seed(7),
            compile_decode=compiled,
        )
    eager, fast = runs[False], runs[True]
    assert torch.equal(eager.tokens, fast.tokens) and torch.equal(eager.lengths, fast.lengths)
    assert eager.lengths.min() > 1  # the compiled steps really ran
    torch.testing.assert_close(fast.logprobs, eager.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.entropy, eager.entropy, rtol=0, atol=1e-5)
    # one prompt column fewer: the same cache-width bucket, so the compiled graph is reused
    short, plain = (
        generate(
            model,
            ids[:, 1:],
            mask[:, 1:],
            max_new_tokens=12,
            eos_id=None,
            pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(1),
            compile_decode=compiled,
        )
        for compiled in (True, False)
    )
    assert torch.equal(short.tokens, plain.tokens)
