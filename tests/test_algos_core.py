"""Logprobs/entropy, KL estimators, reward shaping, masks, statistics, KL controllers."""

import math
import subprocess
import sys

import pytest
import torch

from rlhfkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    explained_variance,
    full_kl_from_logits,
    kl_penalty,
    last_index,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    response_mask,
    shape_rewards,
    token_logprobs,
)

D = torch.float64


def _reference_logprob_entropy(logits, tokens, temperature):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 3), (1.3, 1)])
def test_logprobs_and_entropy_match_reference_values_and_gradients(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g, dtype=D)).requires_grad_()
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    w1, w2 = torch.randn(2, 5, generator=g, dtype=D), torch.randn(2, 5, generator=g, dtype=D)
    lp, ent = logprobs_and_entropy(logits, tokens, temperature, chunk_rows=chunk)
    (lp.double() * w1 + ent.double() * w2).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_lp, ref_ent = _reference_logprob_entropy(logits, tokens, temperature)
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    assert lp.dtype == D and ent.dtype == D  # float64 in, float64 math
    torch.testing.assert_close(lp, ref_lp.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-12)
    only_lp = token_logprobs(logits.detach(), tokens, temperature, chunk_rows=chunk)
    torch.testing.assert_close(only_lp, lp.detach(), rtol=0, atol=0)


def test_chunking_never_changes_fp32_logprobs_or_gradients():
    """Rows are independent: any chunk size gives the same bits, forward and backward (the
    default chunk is sized by bytes, ``chunk_rows_for``; the backward builds each chunk's
    gradient in place from the forward's logsumexp)."""
    from rlhfkit.algos.logprobs import CHUNK_BYTES, chunk_rows_for

    assert chunk_rows_for(49152, None) == CHUNK_BYTES // (4 * 49152) and chunk_rows_for(7, 3) == 3
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (4, 9), generator=g)
    w = torch.randn(4, 9, generator=g)
    outs = []
    for chunk in (None, 5, 36):
        logits = 3 * torch.randn(4, 9, 300, generator=torch.Generator().manual_seed(2))
        logits.requires_grad_()
        lp, ent = logprobs_and_entropy(logits, tokens, 0.8, chunk_rows=chunk)
        (lp * w + 0.5 * ent).sum().backward()
        only = token_logprobs(logits.detach().requires_grad_(), tokens, 0.8, chunk_rows=chunk)
        outs.append((lp.detach(), ent.detach(), logits.grad, only.detach()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("entropy,temperature", [(True, 0.8), (False, 1.0)])
def test_consumed_logits_take_their_own_gradient_bit_for_bit(entropy, temperature):
    """``consume=True`` (the LM head's temporary logits inside a forward): the backward writes
    the logits' gradient into their memory; every gradient upstream is the same bits as with a
    new tensor, and a second backward through the overwritten logits fails loudly."""
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(2, 7, 16, generator=g), torch.randn(300, 16, generator=g)
    tokens = torch.randint(0, 300, (2, 7), generator=g)
    weights = torch.randn(2, 7, generator=g)
    grads, seen = [], []
    for consume in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logits = h @ w.T  # a temporary, as the LM head's output is
        logits.register_hook(lambda grad: seen.append(grad.clone()))
        if entropy:
            lp, ent = logprobs_and_entropy(logits, tokens, temperature, 5, consume=consume)
            loss = (lp * weights + 0.3 * ent).sum()
        else:
            loss = (token_logprobs(logits, tokens, temperature, 5, consume=consume) * weights).sum()
        loss.backward(retain_graph=True)
        grads.append((h.grad, w.grad))
        if consume:
            assert torch.equal(logits.detach(), seen[-1])  # the gradient, in the logits' memory
            with pytest.raises(RuntimeError, match="inplace"):
                loss.backward()
    assert torch.equal(seen[0], seen[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cpu_isa
def test_logprobs_bf16_logits_give_float32_outputs_and_grads_in_input_dtype():
    logits = torch.randn(3, 4, 17).bfloat16().requires_grad_()
    tokens = torch.randint(0, 17, (3, 4))
    lp, ent = logprobs_and_entropy(logits, tokens, chunk_rows=5)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_lp, ref_ent = _reference_logprob_entropy(logits.detach().float(), tokens, 1.0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)


def test_kl_estimators_closed_forms_and_unbiasedness():
    lp, ref = torch.tensor([math.log(0.5)], dtype=D), torch.tensor([math.log(0.25)], dtype=D)
    r = 0.25 / 0.5
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(-math.log(r), abs=1e-15)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(r) ** 2, abs=1e-15)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx((r - 1) - math.log(r), abs=1e-15)
    # E_{a~p}[k1] = E_{a~p}[k3] = KL(p||q) exactly, computed over the whole support
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=D)
    kl = (p * (p / q).log()).sum()
    for est in ["k1", "k3"]:
        assert (p * kl_penalty(p.log(), q.log(), est)).sum().item() == pytest.approx(
            kl.item(), abs=1e-14
        )
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, ref, "k4")


def test_full_kl_from_logits():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 7, generator=g, dtype=D), torch.randn(2, 3, 7, generator=g, dtype=D)
    p, q = torch.softmax(a / 0.8, -1), torch.softmax(b / 0.8, -1)
    ref = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(
        full_kl_from_logits(a, b, 0.8, chunk_rows=2), ref, rtol=0, atol=1e-12
    )
    assert torch.all(full_kl_from_logits(a, a).abs() < 1e-12)


def test_response_mask_and_last_index():
    eos = 9
    tokens = torch.tensor([[4, 5, 9, 7, 9], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    mask = response_mask(tokens, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert last_index(mask).tolist() == [2, 4, 0]
    assert response_mask(tokens, [5, 9]).tolist()[1] == [1, 1, 1, 1, 1]
    assert response_mask(tokens, [5, 9]).tolist()[0] == [1, 1, 0, 0, 0]


def test_shape_rewards_seed_formula():
    kl = torch.tensor([[0.1, 0.2, 0.3, 55.0], [0.4, 0.5, 66.0, 77.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0], dtype=D)
    beta = 0.5
    rewards, stats = shape_rewards(kl, scores, mask, beta)
    expected = torch.tensor(
        [[-0.05, -0.1, 2.0 - 0.15, 0.0], [-0.2, -1.0 - 0.25, 0.0, 0.0]], dtype=D
    )
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(stats["kl_sum"], torch.tensor([0.6, 0.9], dtype=D))
    torch.testing.assert_close(stats["non_score_reward"], torch.tensor([-0.3, -0.45], dtype=D))


def test_masked_stats_match_torch_on_selected_entries():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=D)
    mask = torch.rand(4, 6, generator=g) > 0.4
    garbage = torch.where(mask, x, torch.full_like(x, float("inf")))
    sel = x[mask]
    assert masked_mean(garbage, mask).item() == pytest.approx(sel.mean().item(), abs=1e-14)
    assert masked_var(garbage, mask).item() == pytest.approx(sel.var().item(), abs=1e-14)
    assert masked_var(garbage, mask, unbiased=False).item() == pytest.approx(
        sel.var(unbiased=False).item(), abs=1e-14
    )
    w = masked_whiten(garbage, mask)
    assert w[mask].mean().item() == pytest.approx(0, abs=1e-12)
    assert w[mask].var().item() == pytest.approx(1, abs=1e-6)
    assert torch.all(w[~mask] == 0)
    wk = masked_whiten(garbage, mask, keep_mean=True)
    assert wk[mask].mean().item() == pytest.approx(sel.mean().item(), abs=1e-12)
    torch.testing.assert_close(wk[mask] - sel.mean(), w[mask])


def test_explained_variance():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(t, t, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(t, 2.5), t, m).item() == pytest.approx(0.0)


def test_running_mean_std_equals_batch_statistics():
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(n, generator=g, dtype=D) * 3 + 1 for n in (5, 1, 17, 8)]
    rms = RunningMeanStd()
    for c in chunks:
        rms.update(c)
    allx = torch.cat(chunks)
    assert rms.count == allx.numel()
    assert rms.mean == pytest.approx(allx.mean().item(), abs=1e-12)
    assert rms.var == pytest.approx(allx.var(unbiased=False).item(), abs=1e-12)
    normed = rms.normalize(allx)
    assert normed.mean().item() == pytest.approx(0, abs=1e-12)
    clone = RunningMeanStd()
    clone.load_state_dict(rms.state_dict())
    assert clone == rms


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=500)  # error = clip(0.5) = 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 500 / 10000))
    ctl.update(current_kl=5.4, n_steps=1000)  # error = -0.1
    assert ctl.value == pytest.approx(0.2 * 1.01 * (1 - 0.1 * 0.1))
    restored = AdaptiveKLController(value=1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_algos_import_pulls_in_no_transformers():
    code = "import sys, rlhfkit.algos; bad = [m for m in ('transformers', 'rlhfkit.config', 'rlhfkit.models', 'yaml') if m in sys.modules]; print(bad); assert not bad"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
