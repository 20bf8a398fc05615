"""Sampling: top-k/top-p filters, inverse-CDF sampling, and the KV-cache loop against HF generate."""

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import pad_left
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout import sampling
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
    assert out.stopped.any(), "no row stopped: the stop-sequence branch went untested"
    for row, n, stopped in zip(out.tokens, out.lengths, out.stopped, strict=True):
        n = int(n)
        if stopped:  # ends exactly at the first 'red', padded after
            assert row[n - 1] == red and (row[: n - 1] != red).all()
            assert (row[n:] == tok.pad_token_id).all()
        else:
            assert n == 12 and (row != red).all()
    # a two-token stop sequence ends a row only where both tokens follow each other
    blue = tok.convert_tokens_to_ids("blue")
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=24,
        eos_id=None,
        pad_id=tok.pad_token_id,
        temperature=3.0,
        stop_sequences=[[red, blue]],
        generator=g,
    )  # ~3 expected stops over 64 rows x 23 pairs from a near-uniform 22-word vocabulary
    assert out.stopped.any()
    for row, n, stopped in zip(out.tokens, out.lengths, out.stopped, strict=True):
        n = int(n)
        pairs = [i for i in range(1, n) if row[i - 1] == red and row[i] == blue]
        assert pairs == ([n - 1] if stopped else [])


TEXTS = ["copy : red blue :", "say gold", "copy : green :"]


def _sample(policy, repeat: int, max_new_tokens: int, temperature: float, seed: int, **kw):
    """Sampled responses to TEXTS x repeat that stop at EOS."""
    tok, model = policy
    ids, mask = pad_left([tok(t)["input_ids"] for t in TEXTS] * repeat, tok.pad_token_id)
    return generate(
        model,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def _assert_same_samples(a, b, atol: float) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=atol)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=atol)


def test_preallocated_cache_gives_hf_cache_results(policy, monkeypatch):
    """The eager loop's in-place KV cache against HF's concatenating DynamicCache: the same
    samples from the same generator, logprobs and entropy equal to fp32 rounding, EOS stops
    included."""
    cache = sampling.preallocated_cache(policy[1], 8)
    assert cache is not None and all(isinstance(x, sampling._FilledView) for x in cache.layers)
    ours = _sample(policy, 4, max_new_tokens=10, temperature=1.5, seed=3)
    monkeypatch.setattr(sampling, "preallocated_cache", lambda model, capacity: None)
    ref = _sample(policy, 4, max_new_tokens=10, temperature=1.5, seed=3)  # HF's DynamicCache
    _assert_same_samples(ours, ref, atol=1e-6)
    assert ours.lengths.max() > 2 and ours.stopped.any()


def test_preallocated_cache_refuses_overflow_and_sliding_windows():
    layer = sampling._FilledView(capacity=3)
    kv = torch.randn(2, 1, 2, 4)
    keys, _ = layer.update(kv, kv)
    assert torch.equal(keys, kv) and layer.get_seq_length() == 2
    keys, values = layer.update(kv[:, :, :1] + 1, kv[:, :, :1] - 1)
    assert torch.equal(keys, torch.cat([kv, kv[:, :, :1] + 1], dim=2))
    assert torch.equal(values, torch.cat([kv, kv[:, :, :1] - 1], dim=2))
    with pytest.raises(RuntimeError, match="3 columns"):
        layer.update(kv, kv)
    layer.crop(-2)  # HF's crop: the next write goes after the one column left
    keys, _ = layer.update(kv, kv)
    assert torch.equal(keys, torch.cat([kv[:, :, :1], kv], dim=2))
    from transformers import MistralConfig, MistralForCausalLM

    conf = MistralConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, sliding_window=4,
    )  # fmt: skip
    assert sampling.preallocated_cache(MistralForCausalLM(conf), 8) is None


@pytest.mark.cpu_isa
@pytest.mark.slow
def test_compiled_static_cache_decoding_equals_the_eager_loop(policy):
    """rollout.compile: torch.compile'd decode step over a StaticCache against the plain eager
    loop: the same samples (same generator), logprobs and entropy within fp32 rounding, stops at
    EOS included; a second call with another prompt width in the same bucket reuses the graph."""
    tok, model = policy
    ids, mask = pad_left([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    eager, fast = (
        _sample(policy, 1, max_new_tokens=12, temperature=0.8, seed=7, compile_decode=compiled)
        for compiled in (False, True)
    )
    _assert_same_samples(fast, eager, atol=1e-5)
    assert eager.lengths.min() > 1  # the compiled steps really ran
    kept = model._rlhfkit_static_cache[1]
    # one prompt column fewer: the same cache-width bucket, so the compiled graph and the cache
    # (reset in place: the fixed addresses a CUDA graph reads) are reused
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
    assert model._rlhfkit_static_cache[1] is kept


@pytest.mark.cpu_isa
def test_the_static_cache_keeps_each_dtype_under_bf16_autocast(policy):
    """bf16-mixed with rollout.compile: under bf16 autocast a Llama's keys leave the rotary
    embedding in fp32 and its values leave v_proj in bf16. The compiled path's static cache stores
    each in its own dtype (the GPU image's transformers 5.17 allocated both in the keys' dtype and
    the first value write raised), and a prefill plus decode steps through it (eager here; the
    graph is the same forward) give the growing dynamic cache's logits within bf16 rounding.

    Why not exactly: the two caches hand attention key/value tensors of different widths, and
    CPUs without AVX-512 bf16 instructions run bf16 matmuls in kernels whose summation order
    follows the width (issue 21: one bf16 step, 2^-10 at logits of ~0.3, on an AVX2 EPYC). The
    bound is the format's, not a CPU's: each path must be as close to the fp32 forward as the
    dynamic cache's bf16 error allows, plus one bf16 rounding step of the largest logit."""
    from rlhfkit.algos import position_ids
    from rlhfkit.models.compat import cache_kwargs, output_cache

    tok, model = policy
    ids, mask = pad_left([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    b, p = ids.shape
    steps = torch.randint(4, len(tok), (b, 3), generator=torch.Generator().manual_seed(0))
    pos = position_ids(mask)
    width = p + steps.shape[1]
    logits = {}
    for kind in ("static", "dynamic", "fp32"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind != "fp32"):
            cache = sampling.static_cache(model, width) if kind == "static" else None
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **({} if cache is None else cache_kwargs(model, cache)),
            )
            cache, seen = output_cache(out), [out.logits[:, -1].float()]
            full = torch.cat([mask, torch.zeros(b, steps.shape[1], dtype=mask.dtype)], dim=1)
            for t in range(steps.shape[1]):
                full[:, p + t] = 1
                out = model(
                    input_ids=steps[:, t : t + 1],
                    attention_mask=full if kind == "static" else full[:, : p + t + 1],
                    position_ids=pos[:, -1:] + 1 + t,
                    use_cache=True,
                    cache_position=torch.tensor([p + t]),
                    **cache_kwargs(model, cache),
                )
                cache = output_cache(out)
                seen.append(out.logits[:, -1].float())
            logits[kind] = torch.stack(seen)
            if kind == "static":  # the point of the test: each buffer in its tensor's dtype
                layer = cache.layers[0]
                assert layer.keys.dtype == torch.float32, layer.keys.dtype
                assert layer.values.dtype == torch.bfloat16, layer.values.dtype
                assert layer.keys.shape[2] == width
    ref = logits["fp32"]
    assert torch.isfinite(logits["static"]).all()
    bf16_step = torch.finfo(torch.bfloat16).eps * ref.abs().max()  # one rounding of the largest
    dynamic_err = (logits["dynamic"] - ref).abs().max()
    static_err = (logits["static"] - ref).abs().max()
    assert dynamic_err > 0  # autocast really ran in bf16
    assert static_err <= dynamic_err + bf16_step, (static_err, dynamic_err, bf16_step)
    # and the two bf16 paths differ by at most that much from each other
    assert (logits["static"] - logits["dynamic"]).abs().max() <= 2 * dynamic_err + bf16_step


def test_the_loop_draws_what_a_cache_free_replay_with_softmax_draws(policy):
    """The loop samples from exp(log_softmax(z / T)), the one full-vocabulary pass it also takes
    the logprobs and the entropy from (issue 24); the loop before ran softmax(z / T) again for the
    draw. A replay without a KV cache, one full forward per step, sampling each step with
    ``sample_from_logits`` from the same seed, draws the same tokens, and its logprobs and
    entropies equal the loop's to fp32 rounding."""
    from rlhfkit.algos import position_ids

    tok, model = policy
    prompts = [tok("copy : red blue :")["input_ids"], tok("say gold")["input_ids"]] * 3
    ids, mask = pad_left(prompts, tok.pad_token_id)
    n, temp = 12, 0.7
    out = generate(model, ids, mask, max_new_tokens=n, eos_id=None, pad_id=tok.pad_token_id,
                   temperature=temp, generator=torch.Generator().manual_seed(3))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    seq, m = ids, mask.long()
    with torch.no_grad():
        for t in range(n):
            logits = model(input_ids=seq, attention_mask=m, position_ids=position_ids(m)).logits
            drawn = sample_from_logits(logits[:, -1] / temp, g)  # the old loop's draw
            z = logits[:, -1].double() / temp
            assert torch.equal(drawn, out.tokens[:, t]), t
            logp = torch.log_softmax(z, -1)
            want_lp = logp.gather(1, drawn[:, None]).squeeze(1)
            torch.testing.assert_close(out.logprobs[:, t].double(), want_lp, rtol=0, atol=1e-5)
            want_h = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(out.entropy[:, t].double(), want_h, rtol=0, atol=1e-5)
            seq = torch.cat([seq, drawn[:, None]], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert len(set(map(tuple, out.tokens.tolist()))) > 1  # the rows really sampled


def test_distinct_prompts_finds_the_rows_of_each_prompt():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [0, 5, 6], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    first, inverse = sampling.distinct_prompts(ids, mask)
    # row 3 has row 0's ids but not its mask: a prompt of its own
    assert len(first) == 3
    for row in range(5):
        rep = int(first[inverse[row]])
        assert torch.equal(ids[rep], ids[row]) and torch.equal(mask[rep], mask[row])
        assert rep <= row  # the first row of its prompt
    assert sampling.distinct_prompts(ids[:2], mask[:2]) is None


def test_prefilling_each_distinct_prompt_once_changes_no_bit(policy, monkeypatch):
    """GRPO's groups repeat a prompt: ``generate`` runs the prompt forward once per distinct
    prompt and copies its KV cache and logits to the group's rows. Samples, logprobs and
    entropies equal prefilling every row, bit for bit."""
    tok, model = policy
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: (
            prefill_rows.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None
        ),
        with_kwargs=True,
    )
    try:
        shared = _sample(policy, repeat=4, max_new_tokens=10, temperature=2.0, seed=3)
        monkeypatch.setattr(sampling, "distinct_prompts", lambda ids, mask: None)
        every = _sample(policy, repeat=4, max_new_tokens=10, temperature=2.0, seed=3)
    finally:
        hook.remove()
    assert [s[0] for s in prefill_rows] == [len(TEXTS), 4 * len(TEXTS)]
    for f in ("tokens", "lengths", "stopped", "logprobs", "entropy"):
        assert torch.equal(getattr(shared, f), getattr(every, f)), f
    assert len({tuple(r.tolist()) for r in shared.tokens}) > len(TEXTS)  # the rows sampled apart


def test_dropping_ended_rows_changes_no_sample(policy, monkeypatch):
    """``generate`` drops rows that ended (EOS) from the decode batch and their KV cache rows
    (``_compact``); the rows left decode as before, from the same random stream: tokens and
    lengths equal decoding every row to the end, logprobs and entropies to fp32 rounding (the
    forward runs on fewer rows), and the rows really were dropped along the way."""
    tok, model = policy
    batches = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        kw = {"repeat": 4, "max_new_tokens": 24, "temperature": 2.0, "seed": 3}
        dropped = _sample(policy, **kw)
        assert min(batches) < max(batches[1:])  # the decode batch shrank
        monkeypatch.setattr(sampling, "_compact", lambda done: False)
        batches.clear()
        every = _sample(policy, **kw)
        assert len(set(batches[1:])) == 1  # every row to the end
    finally:
        hook.remove()
    assert dropped.stopped.any() and not dropped.stopped.all()  # some rows end early, some not
    _assert_same_samples(dropped, every, atol=1e-6)
    assert torch.equal(dropped.stopped, every.stopped)
    for g in (dropped, every):  # nothing after a row's end
        assert float(g.logprobs[~g.mask].abs().max()) == 0.0
        assert bool((g.tokens[~g.mask] == tok.pad_token_id).all())
