"""PPO, value, entropy and reward-model losses against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.algos import (
    aggregate,
    entropy_bonus,
    pairwise_accuracy,
    pairwise_loss,
    policy_loss,
    ranking_loss,
    value_loss,
)

D = torch.float64
EPS = 0.2


def _one_token_loss(ratio, adv):
    lp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    loss, stats = policy_loss(
        lp, torch.zeros(1, 1, dtype=D), torch.tensor([[adv]], dtype=D), torch.ones(1, 1), EPS
    )
    loss.backward()
    return loss.item(), lp.grad.item(), stats


# (ratio, advantage, expected loss, gradient is zero?, clipped?)
REGIMES = [
    (1.5, 2.0, -(1 + EPS) * 2.0, True, True),  # A > 0, ratio above 1+eps: clipped, no gradient
    (0.5, 2.0, -0.5 * 2.0, False, False),  # A > 0, ratio below 1-eps: unclipped, pushes ratio up
    (0.5, -2.0, -(1 - EPS) * -2.0, True, True),  # A < 0, ratio below 1-eps: clipped, no gradient
    (
        1.5,
        -2.0,
        -1.5 * -2.0,
        False,
        False,
    ),  # A < 0, ratio above 1+eps: unclipped, pushes ratio down
]


@pytest.mark.parametrize("ratio,adv,expected,zero_grad,clipped", REGIMES)
def test_policy_loss_four_clip_regimes(ratio, adv, expected, zero_grad, clipped):
    loss, grad, stats = _one_token_loss(ratio, adv)
    assert loss == pytest.approx(expected, abs=1e-12)
    if zero_grad:
        assert grad == 0.0
    else:
        # d(-ratio * A)/d logp = -ratio * A: descent raises logp when A > 0 and lowers it when A < 0
        assert grad == pytest.approx(-ratio * adv, abs=1e-12)
        assert math.copysign(1, -grad) == math.copysign(1, adv)
    assert stats["clip_frac"].item() == float(clipped)
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-12)


def test_policy_loss_ratio_one_is_minus_mean_advantage_and_padding_ignored():
    adv = torch.tensor([[1.0, -3.0, 5.0], [2.0, 1e9, 1e9]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    lp = torch.zeros(2, 3, dtype=D)
    old = torch.where(mask, lp, torch.full_like(lp, -1e4))  # garbage old logprobs in pads
    loss, stats = policy_loss(lp, old, adv, mask, EPS, "token")
    assert loss.item() == pytest.approx(-(1 - 3 + 5 + 2) / 4)
    loss, _ = policy_loss(lp, old, adv, mask, EPS, "sequence")
    assert loss.item() == pytest.approx(-((1 - 3 + 5) / 3 + 2) / 2)
    assert stats["clip_frac"].item() == 0 and stats["approx_kl"].item() == 0


def test_value_loss_unclipped_and_clipped():
    v = torch.tensor([[1.0, 2.0, 9.0]], dtype=D)
    old = torch.tensor([[0.0, 1.9, 0.0]], dtype=D)
    ret = torch.tensor([[2.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, _ = value_loss(v, old, ret, mask)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss, stats = value_loss(v, old, ret, mask, clip_eps=0.5)
    # token 0: v_clip = 0.5 -> (0.5-2)^2 = 2.25 > 1 -> clipped; token 1: v_clip = 2.0 -> 4 = 4 not greater
    assert loss.item() == pytest.approx((2.25 + 4) / 2)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


def test_entropy_and_aggregation():
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert entropy_bonus(ent, mask).item() == pytest.approx(2.5)
    assert entropy_bonus(ent, mask, "sequence").item() == pytest.approx(3.0)
    empty_row = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert aggregate(ent, empty_row, "sequence").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(ent, mask, "bogus")


def test_bradley_terry_hand_values():
    c, r = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    loss, stats = pairwise_loss(c, r)
    expected = sum(math.log1p(math.exp(-d)) for d in [1.0, -1.0, 0.0]) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx((1 + 0 + 0.5) / 3)
    loss_m, _ = pairwise_loss(c, r, margin=torch.tensor([1.0, 0.0, 0.0]))
    expected_m = (math.log1p(math.exp(-0.0)) + math.log1p(math.exp(1.0)) + math.log(2)) / 3
    assert loss_m.item() == pytest.approx(expected_m, abs=1e-6)
    assert pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])).item() == 0.5


def test_ranking_loss_hand_values_and_padding():
    nll = lambda d: math.log1p(math.exp(-d))  # noqa: E731
    r = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.0, -99.0]], dtype=D)
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, stats = ranking_loss(r, valid)
    first = (nll(2.0) + nll(1.0) + nll(-1.0)) / 3  # pairs (0,1), (0,2), (1,2)
    second = nll(0.5)  # one pair; the padded third response is ignored
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-12)
    assert stats["accuracy"].item() == pytest.approx(3 / 4)


def test_ranking_loss_k2_equals_pairwise():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(7, generator=g, dtype=D), torch.randn(7, generator=g, dtype=D)
    torch.testing.assert_close(
        ranking_loss(torch.stack([c, r], 1))[0], pairwise_loss(c, r)[0], rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_split_batch_with_whole_batch_denominator_sums_to_the_whole(aggregation):
    """Gradient accumulation / data parallelism: pieces divided by the whole batch's count add up."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=D)
    mask = torch.arange(5)[None] < torch.tensor([5, 1, 3, 0, 4, 2])[:, None]
    whole = aggregate(x, mask, aggregation)
    count = mask.sum() if aggregation == "token" else mask.any(1).sum()
    parts = aggregate(x[:2], mask[:2], aggregation, count) + aggregate(
        x[2:], mask[2:], aggregation, count
    )
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    assert aggregate(x, mask, aggregation, count).item() == pytest.approx(whole.item(), abs=1e-15)


# --------------------------------------------------------------------------- GSPO, CISPO (issue 23)


def _rl_batch(seed: int, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv_seq = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 0])[:b]
    mask = torch.arange(t)[None] < lengths[:, None]
    adv = adv_seq[:, None].expand(b, t).clone()  # an outcome advantage: one per response
    return lp, old, adv, adv_seq, mask


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.05, 0.3), (3e-4, 4e-4)])
def test_gspo_matches_the_sequence_level_objective_in_float64(eps_low, eps_high):
    """GSPO eq. 5-7 written per sequence: s_i = exp(mean_t log rho), the loss
    -1/G sum_i min(s_i A_i, clip(s_i) A_i) over non-empty responses; loss and gradient."""
    from rlhfkit.algos.losses import gspo_loss

    lp, old, adv, adv_seq, mask = _rl_batch(0)
    # rows 1 and 3 barely off policy: at the paper's epsilons they stay unclipped, the rest not
    old = torch.cat([old[:1], lp[1:2].detach() + 1e-5, old[2:3], lp[3:4].detach() - 2e-5, old[4:]])
    loss, stats = gspo_loss(lp, old, adv, mask, eps_low, "sequence", clip_eps_high=eps_high)
    (grad,) = torch.autograd.grad(loss, lp)
    ref_lp = lp.detach().clone().requires_grad_()
    terms, clipped = [], 0
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        s = torch.exp(sum(ref_lp[i, t] - old[i, t] for t in range(n)) / n)
        a = adv_seq[i]
        terms.append(torch.min(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a))
        clipped += int(not (1 - eps_low <= float(s.detach()) <= 1 + eps_high))
    ref = -torch.stack(terms).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_lp)
    assert float(loss) == pytest.approx(float(ref), abs=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-9)
    assert float(stats["clip_frac"]) == pytest.approx(clipped / len(terms), abs=1e-12)
    if eps_high < 0.01:  # the paper's epsilons: some responses clipped, some not (issue 36)
        assert 0 < clipped < len(terms)
    assert (grad[~mask] == 0).all()


def test_gspo_ignores_garbage_in_padded_positions():
    from rlhfkit.algos.losses import gspo_loss

    lp, old, adv, _, mask = _rl_batch(1)
    a, _ = gspo_loss(lp, old, adv, mask, 0.2, "sequence")
    garbage = torch.where(mask, old, torch.full_like(old, 1e6))
    b, _ = gspo_loss(lp, garbage, adv, mask, 0.2, "sequence")
    assert float(a) == float(b)


@pytest.mark.parametrize("eps_low", [None, 0.2])
def test_cispo_matches_its_equation_in_float64(eps_low):
    """MiniMax-M1 eq. 4: -1/N sum_{i,t} sg(clip(rho)) A log pi over the response tokens; the
    gradient of a token is -sg(w) A / N, whatever the ratio (no token loses its gradient)."""
    from rlhfkit.algos.losses import cispo_loss

    lp, old, adv, _, mask = _rl_batch(2)
    eps_high = 0.25
    loss, stats = cispo_loss(lp, old, adv, mask, eps_high, "token", clip_eps=eps_low)
    (grad,) = torch.autograd.grad(loss, lp)
    n = int(mask.sum())
    ref, ref_grad, capped = 0.0, torch.zeros_like(old), 0
    for i, t in mask.nonzero().tolist():
        r = math.exp(float(lp[i, t]) - float(old[i, t]))
        w = min(max(r, 0.0 if eps_low is None else 1 - eps_low), 1 + eps_high)
        capped += int(w != r)
        ref -= w * float(adv[i, t]) * float(lp[i, t]) / n
        ref_grad[i, t] = -w * float(adv[i, t]) / n
    assert float(loss) == pytest.approx(ref, abs=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-9)
    assert float(stats["clip_frac"]) == pytest.approx(capped / n, abs=1e-12)
    assert 0 < capped < n  # the batch exercises the cap


def test_cispo_and_ppo_have_the_same_gradient_on_policy():
    """At rho = 1 (the first minibatch of an iteration) CISPO's gradient is the clipped
    surrogate's: sg(1) A grad log pi."""
    from rlhfkit.algos.losses import cispo_loss

    lp, _, adv, _, mask = _rl_batch(3)
    old = lp.detach().clone()
    (g1,) = torch.autograd.grad(cispo_loss(lp, old, adv, mask, 0.2)[0], lp)
    (g2,) = torch.autograd.grad(policy_loss(lp, old, adv, mask, 0.2)[0], lp)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
