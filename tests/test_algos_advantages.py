"""Advantage estimators against closed forms, direct sums, and each other."""

import pytest
import torch

from rlhfkit.algos import compute_advantages, gae_advantages, mc_advantages, td_advantages

D = torch.float64


def _batch(seed=0, b=5, t=9):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=D)
    values = torch.randn(b, t, generator=g, dtype=D)
    lengths = torch.tensor([t, 1, 4, t - 1, 6][:b])
    mask = torch.arange(t)[None] < lengths[:, None]
    return rewards, values, mask, lengths


def _reference(rewards, values, lengths, gamma, lam):
    """Direct sums per sequence: A_t = sum_l (gamma lam)^l delta_{t+l}, G_t = sum_k gamma^k r_{t+k}."""
    b, t = rewards.shape
    gae, mc, td = (torch.zeros(b, t, dtype=D) for _ in range(3))
    for i in range(b):
        n = int(lengths[i])
        v = [float(values[i, k]) for k in range(n)] + [0.0]  # V past the end is 0
        delta = [float(rewards[i, k]) + gamma * v[k + 1] - v[k] for k in range(n)]
        for k in range(n):
            gae[i, k] = sum((gamma * lam) ** j * delta[k + j] for j in range(n - k))
            mc[i, k] = sum(gamma**j * float(rewards[i, k + j]) for j in range(n - k)) - v[k]
            td[i, k] = delta[k]
    return gae, mc, td


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (0.7, 0.0)])
def test_against_direct_sums(gamma, lam):
    rewards, values, mask, lengths = _batch()
    ref_gae, ref_mc, ref_td = _reference(rewards, values, lengths, gamma, lam)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_gae, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(mask, ref_gae + values, 0.0), rtol=0, atol=1e-12)
    adv, ret = mc_advantages(rewards, values, mask, gamma)
    torch.testing.assert_close(adv, ref_mc, rtol=0, atol=1e-12)
    adv, _ = td_advantages(rewards, values, mask, gamma)
    torch.testing.assert_close(adv, ref_td, rtol=0, atol=1e-12)


def test_single_terminal_reward_closed_form():
    # one reward R at the last token, V = 0: A_t = R * (gamma lam)^(T-1-t) for GAE, gamma^(T-1-t) R for MC
    t, r, gamma, lam = 6, 2.5, 0.9, 0.8
    rewards = torch.zeros(1, t, dtype=D)
    rewards[0, -1] = r
    values = torch.zeros(1, t, dtype=D)
    mask = torch.ones(1, t, dtype=torch.bool)
    k = torch.arange(t - 1, -1, -1, dtype=D)
    adv, _ = gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv[0], r * (gamma * lam) ** k, rtol=0, atol=1e-14)
    adv, ret = mc_advantages(rewards, values, mask, gamma)
    torch.testing.assert_close(adv[0], r * gamma**k, rtol=0, atol=1e-14)
    adv, _ = td_advantages(rewards, values, mask, gamma)
    expected = torch.zeros(t, dtype=D)
    expected[-1] = r
    torch.testing.assert_close(adv[0], expected, rtol=0, atol=0)


def test_constant_value_closed_form_td():
    # r = 0, V = c everywhere over n tokens: delta_t = (gamma - 1) c, except the last: -c
    c, gamma, n = 3.0, 0.5, 4
    values = torch.full((1, n), c, dtype=D)
    adv, ret = td_advantages(
        torch.zeros(1, n, dtype=D), values, torch.ones(1, n, dtype=torch.bool), gamma
    )
    torch.testing.assert_close(adv[0], torch.tensor([(gamma - 1) * c] * (n - 1) + [-c], dtype=D))
    torch.testing.assert_close(ret[0], torch.tensor([gamma * c] * (n - 1) + [0.0], dtype=D))


@pytest.mark.parametrize("gamma", [1.0, 0.93])
def test_gae_lambda_limits(gamma):
    rewards, values, mask, _ = _batch(seed=1)
    torch.testing.assert_close(
        gae_advantages(rewards, values, mask, gamma, 0.0),
        td_advantages(rewards, values, mask, gamma),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        gae_advantages(rewards, values, mask, gamma, 1.0),
        mc_advantages(rewards, values, mask, gamma),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", ["td", "mc", "gae"])
def test_garbage_in_padding_changes_nothing(name):
    rewards, values, mask, _ = _batch(seed=2)
    clean = compute_advantages(name, rewards, values, mask, 0.95, 0.9)
    noisy_r = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    noisy_v = torch.where(mask, values, torch.full_like(values, -7e5))
    dirty = compute_advantages(name, noisy_r, noisy_v, mask, 0.95, 0.9)
    for a, b in zip(clean, dirty, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.all(a[~mask] == 0)


def test_returns_are_advantages_plus_values_and_dispatch():
    rewards, values, mask, _ = _batch(seed=3)
    for name in ["td", "mc", "gae"]:
        adv, ret = compute_advantages(name, rewards, values, mask, 0.9, 0.7)
        torch.testing.assert_close(ret, torch.where(mask, adv + values, 0.0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", rewards, values, mask, 1.0, 1.0)
