"""The critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, REINFORCE++-baseline) against
direct float64 loops written from the formulas, their invariances, and the new loss options
(clip-higher, dual clip, token_sum_norm)."""

import math

import pytest
import torch

from rlhfkit.algos import (
    ESTIMATORS,
    aggregate,
    compute_advantages,
    get_estimator,
    policy_loss,
    shape_rewards,
)

D = torch.float64
OUTCOME = ["grpo", "dr_grpo", "rloo"]
CRITIC_FREE = [*OUTCOME, "reinforce++", "reinforce++_baseline"]


def _batch(seed=0, groups=4, n=3, t=7):
    """Scores, groups in a shuffled order, per-token rewards, and a mask with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    b = groups * n
    group = torch.arange(groups).repeat_interleave(n)[torch.randperm(b, generator=g)] * 10 + 3
    scores = torch.randn(b, generator=g, dtype=D)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    kl = torch.randn(b, t, generator=g, dtype=D).abs()
    return scores, group, mask, kl, lengths


def _reference(name, scores, group, lengths, kl, beta, gamma, t):
    """A direct loop over responses, written from the formulas of docs/algorithms.md."""
    b = len(scores)
    out = torch.zeros(b, t, dtype=D)
    members = {}
    for i in range(b):
        members.setdefault(int(group[i]), []).append(i)
    for i in range(b):
        same = [float(scores[j]) for j in members[int(group[i])]]
        n = len(same)
        mean = sum(same) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in same) / (n - 1))
        others = (sum(same) - float(scores[i])) / (n - 1)
        r_i = float(scores[i])
        length = int(lengths[i])
        if name in ("grpo", "dr_grpo", "rloo"):
            a = {"grpo": (r_i - mean) / (std + 1e-6), "dr_grpo": r_i - mean, "rloo": r_i - others}
            out[i, :length] = a[name]
            continue
        score = r_i - mean if name == "reinforce++_baseline" else r_i
        rewards = [-beta * float(kl[i, k]) for k in range(length)]
        rewards[-1] += score
        for k in range(length):
            out[i, k] = sum(gamma ** (j - k) * rewards[j] for j in range(k, length))
    return out


def _run(name, scores, group, mask, kl, beta, gamma):
    rewards, _ = shape_rewards(kl, scores, mask, beta)
    adv, _ = compute_advantages(name, rewards, None, mask, gamma, 0.95, scores=scores, group=group)
    return adv


@pytest.mark.parametrize("name", CRITIC_FREE)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_estimator_against_a_direct_loop(name, gamma):
    scores, group, mask, kl, lengths = _batch()
    adv = _run(name, scores, group, mask, kl, 0.1, gamma)
    ref = _reference(name, scores, group, lengths, kl, 0.1, gamma, mask.shape[1])
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", CRITIC_FREE)
def test_shuffling_episodes_permutes_the_advantages(name):
    scores, group, mask, kl, _ = _batch(seed=1)
    adv = _run(name, scores, group, mask, kl, 0.1, 1.0)
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(5))
    shuffled = _run(name, scores[perm], group[perm], mask[perm], kl[perm], 0.1, 1.0)
    torch.testing.assert_close(shuffled, adv[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CRITIC_FREE)
def test_garbage_in_padding_changes_nothing(name):
    scores, group, mask, kl, _ = _batch(seed=2)
    adv = _run(name, scores, group, mask, kl, 0.1, 1.0)
    dirty = torch.where(mask, kl, torch.full_like(kl, 1e6))
    adv2 = _run(name, scores, group, mask, dirty, 0.1, 1.0)
    torch.testing.assert_close(adv2, adv, rtol=0, atol=0)
    assert (adv[~mask] == 0).all()


@pytest.mark.parametrize("name", OUTCOME)
def test_a_group_of_equal_rewards_gets_advantage_zero(name):
    scores, group, mask, kl, _ = _batch(seed=3)
    first = group == group[0]
    scores = torch.where(first, torch.full_like(scores, 0.7), scores)
    adv = _run(name, scores, group, mask, kl, 0.1, 1.0)
    assert (adv[first] == 0).all()
    assert (adv[~first].abs().sum(1) > 0).all()


def test_grpo_is_scale_free_and_rloo_is_a_scaled_centring():
    scores, group, mask, kl, _ = _batch(seed=4, n=4)
    a = _run("grpo", scores, group, mask, kl, 0.0, 1.0)
    b = _run("grpo", 3.0 * scores + 5.0, group, mask, kl, 0.0, 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # up to the 1e-6 in the denominator
    # RLOO = n/(n-1) (r_i - mean_g) = n/(n-1) x Dr. GRPO
    rloo = _run("rloo", scores, group, mask, kl, 0.0, 1.0)
    dr = _run("dr_grpo", scores, group, mask, kl, 0.0, 1.0)
    torch.testing.assert_close(rloo, 4 / 3 * dr, rtol=0, atol=1e-12)


def test_registry_knows_what_each_estimator_needs():
    need = {k: (e.needs_values, e.needs_groups) for k, e in ESTIMATORS.items()}
    assert need["gae"] == need["td"] == need["mc"] == (True, False)
    assert need["grpo"] == need["rloo"] == need["dr_grpo"] == (False, True)
    assert need["reinforce++"] == (False, False)
    assert need["reinforce++_baseline"] == (False, True)
    assert get_estimator("reinforce++").whiten is True and get_estimator("grpo").whiten is False
    with pytest.raises(ValueError, match="needs \\['group'\\]"):
        compute_advantages(
            "rloo", torch.zeros(2, 3), None, torch.ones(2, 3), 1.0, 1.0, torch.zeros(2)
        )
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        get_estimator("ppo2")


# --------------------------------------------------------------------------- loss options


def _loss(logp, old, adv, **kw):
    mask = torch.ones_like(logp, dtype=torch.bool)
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, **kw)
    loss.backward()
    return loss.item(), logp.grad


def test_clip_higher_uses_the_upper_epsilon_for_positive_advantages():
    old = torch.zeros(1, 1, dtype=D)
    rho = 1.25  # inside [0.8, 1.28] but above 1.2
    logp = torch.full((1, 1), math.log(rho), dtype=D)
    adv = torch.ones(1, 1, dtype=D)
    sym, g_sym = _loss(logp, old, adv)
    high, g_high = _loss(logp, old, adv, clip_eps_high=0.28)
    assert sym == pytest.approx(-1.2, abs=1e-12) and g_sym.abs().sum() == 0  # clipped at 1 + 0.2
    assert high == pytest.approx(-rho, abs=1e-12) and g_high.item() == pytest.approx(-rho)
    # the lower bound stays clip_eps: rho = 0.75 with A < 0 is clipped at 0.8
    low, g_low = _loss(torch.full((1, 1), math.log(0.75), dtype=D), old, -adv, clip_eps_high=0.28)
    assert low == pytest.approx(0.8, abs=1e-12) and g_low.abs().sum() == 0


def test_dual_clip_bounds_the_loss_of_a_negative_advantage():
    old = torch.zeros(2, 1, dtype=D)
    logp = torch.full((2, 1), math.log(5.0), dtype=D)  # rho = 5
    adv = torch.tensor([[-1.0], [1.0]], dtype=D)
    plain, _ = _loss(logp[:1], old[:1], adv[:1])
    assert plain == pytest.approx(5.0, abs=1e-12)  # -min(5 x -1, 1.2 x -1) = 5
    dual, g = _loss(logp[:1], old[:1], adv[:1], dual_clip=3.0)
    assert dual == pytest.approx(3.0, abs=1e-12) and g.abs().sum() == 0  # bounded by -c A
    # positive advantages are untouched by the dual clip
    pos, _ = _loss(logp[1:], old[1:], adv[1:], dual_clip=3.0)
    assert pos == pytest.approx(-1.2, abs=1e-12)


def test_token_sum_norm_divides_by_a_constant():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(x, m, "token_sum_norm").item() == pytest.approx(10 / 6)
    assert aggregate(x, m, "token_sum_norm", denominator=20.0).item() == pytest.approx(0.5)
    assert aggregate(x, m, "token").item() == pytest.approx(10 / 4)


def test_k3_loss_gradient_is_the_forward_kl_gradient():
    """The documented bias of ``kl_in: loss`` with k3 (Tang & Munos 2025): the expected gradient
    of k3 at samples of pi_theta is grad KL(pi_ref || pi_theta), not grad KL(pi_theta || pi_ref)."""
    from rlhfkit.algos import kl_penalty

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=D), 0)
    logp = torch.log_softmax(z, 0)
    # E_{a ~ pi}[grad k3(a)], exactly: sum_a pi(a) grad k3(a), pi held fixed (the sampling weight)
    k3 = kl_penalty(logp, ref, "k3")
    (expected_grad,) = torch.autograd.grad((logp.exp().detach() * k3).sum(), z, retain_graph=True)
    forward = (ref.exp() * (ref - torch.log_softmax(z, 0))).sum()  # KL(ref || pi)
    reverse = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    (g_fwd,) = torch.autograd.grad(forward, z, retain_graph=True)
    (g_rev,) = torch.autograd.grad(reverse, z)
    torch.testing.assert_close(expected_grad, g_fwd, rtol=0, atol=1e-12)
    assert (expected_grad - g_rev).abs().max() > 1e-2
