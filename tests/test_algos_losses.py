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
