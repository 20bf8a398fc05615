"""Advantage estimators, each returning (advantages, returns), and the registry that names them.

Two families share one signature style and one registry (``ESTIMATORS``):
- the seed's critic estimators over per-token rewards and values: td, mc, gae;
- the critic-free family: outcome-level estimators over per-response scores and group ids
  (grpo, dr_grpo, rloo) and the REINFORCE++ returns over the shaped per-token rewards.

rewards, values, mask are (B, T), right-padded; V(s_t) past the end is 0 (the episode is over).
scores (B,) are the per-response scores R_final; group (B,) int says which prompt a response
answers (responses to the same prompt share a group id).
``returns`` are the value targets: returns = advantages + values, which is
    td:  r_t + gamma V(s_{t+1})             (one-step TD target)
    mc:  sum_k gamma^k r_{t+k}              (Monte Carlo return)
    gae: lambda-return                      (Schulman et al. 2016, eq. 16)

GAE interpolates: lambda = 0 gives td, lambda = 1 gives mc.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhfkit.algos.masking import last_index


def _clean(rewards, values, mask):
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    m = mask.bool()
    return torch.where(m, rewards, zero), torch.where(m, values.to(rewards.dtype), zero)


def _next_values(values: torch.Tensor) -> torch.Tensor:
    # V(s_{t+1}); 0 beyond the last column, and 0 in pads because values were cleaned
    return torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda): A_t = delta_t + gamma * lambda * A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t.

    Schulman et al., "High-Dimensional Continuous Control Using GAE" (2016), eq. 11-16.
    """
    r, v = _clean(rewards, values, mask)
    delta = r + gamma * _next_values(v) - v  # (B, T), 0 in pads
    adv = torch.zeros_like(delta)
    running = torch.zeros_like(delta[:, 0])
    for t in range(delta.shape[1] - 1, -1, -1):  # T is small (responses); the loop is not the cost
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = torch.where(mask.bool(), adv, torch.zeros_like(adv))
    return adv, adv + v


def td_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step TD error: A_t = r_t + gamma V(s_{t+1}) - V(s_t). Low variance, biased by V. (lam is ignored)"""
    r, v = _clean(rewards, values, mask)
    returns = torch.where(mask.bool(), r + gamma * _next_values(v), torch.zeros_like(r))
    return returns - v, returns


def mc_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo: A_t = sum_k gamma^k r_{t+k} - V(s_t). Unbiased, high variance. (lam is ignored)"""
    r, v = _clean(rewards, values, mask)
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    return returns - v, returns


# --------------------------------------------------------------------------- the critic-free family


def group_moments(
    scores: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response statistics of its own group: (mean_g, unbiased std_g, n_g), each (B,).

    std_g uses n - 1 (``torch.std``'s default, as TRL and verl compute it); a group of one has
    std 0 (its only member is its mean)."""
    _, inv = torch.unique(group, return_inverse=True)  # (B,) group index 0..G-1
    n = torch.zeros(int(inv.max()) + 1, dtype=scores.dtype, device=scores.device)
    n = n.index_add(0, inv, torch.ones_like(scores))  # (G,)
    # the mean of the shifts from the group's minimum: exactly the minimum when all are equal,
    # so a group of equal rewards gets an advantage of exactly 0 (a plain sum/n is off by ulps)
    lo = torch.full_like(n, math.inf).scatter_reduce(0, inv, scores, "amin")[inv]  # (B,)
    mean = lo + (torch.zeros_like(n).index_add(0, inv, scores - lo) / n)[inv]  # (B,)
    sq = torch.zeros_like(n).index_add(0, inv, (scores - mean) ** 2)
    std = (sq / (n - 1).clamp(min=1)).sqrt()[inv]
    return mean, std, n[inv]


def _per_token(adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A response-level advantage (B,) on every token of its response (B, T); 0 in pads.
    Returned twice: outcome estimators have no separate value target."""
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    out = torch.where(mask.bool(), adv[:, None], zero)  # (B, 1) broadcast over (B, T)
    return out, out


def grpo_advantages(scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor):
    """GRPO, outcome supervision: A_i = (r_i - mean_g) / (std_g + 1e-6) on every token of response i.

    Shao et al. 2024, "DeepSeekMath", sec. 4.1.2; std_g is the group's unbiased sample std."""
    mean, std, _ = group_moments(scores, group)
    return _per_token((scores - mean) / (std + 1e-6), mask)


def dr_grpo_advantages(scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor):
    """Dr. GRPO: A_i = r_i - mean_g, GRPO without the std division (which up-weights groups of
    near-equal rewards). Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2.
    Pair it with ``aggregation: token_sum_norm`` for the paper's length-unbiased loss."""
    mean, _, _ = group_moments(scores, group)
    return _per_token(scores - mean, mask)


def rloo_advantages(scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor):
    """RLOO: A_i = r_i - mean_{j != i} r_j, the mean of the other n - 1 responses to the prompt.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", eq. 6
    (Kool et al. 2019). Equal to n/(n-1) (r_i - mean_g); a group of one gets 0."""
    mean, _, n = group_moments(scores, group)
    return _per_token(n / (n - 1).clamp(min=1) * (scores - mean), mask)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float):
    """REINFORCE++: G_t = sum_{k>=t} gamma^(k-t) r_k over the shaped per-token rewards (-beta KL_t,
    the score added at the last token), no critic. The whitening over every response token of
    the whole batch (all ranks) is the caller's (the registry marks it ``whiten=True``).

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs", sec. 3."""
    _, returns = mc_advantages(rewards, torch.zeros_like(rewards), mask, gamma)
    return returns, returns


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    group: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
):
    """REINFORCE++-baseline: the group mean of the scores subtracted first (at the last token, where
    the score sits), then REINFORCE++. Hu 2025, sec. 3 ("REINFORCE++-baseline")."""
    mean, _, _ = group_moments(scores, group)
    centred = rewards.clone()
    centred.scatter_add_(1, last_index(mask)[:, None], -mean[:, None].to(rewards.dtype))
    return reinforce_pp_advantages(centred, mask, gamma)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator.

    fn:     the pure function; returns (advantages (B, T), returns (B, T))
    inputs: the names of its arguments, taken from rewards, values, scores, group, mask, gamma,
            lam. The registry reads from them what the estimator needs: ``values`` means a
            critic, ``group`` means several responses per prompt.
    whiten: None = ``ppo.whiten_advantages`` decides; True/False = the method's own rule
            (REINFORCE++ always whitens over the batch; group estimators are already scaled)."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    inputs: tuple[str, ...]
    whiten: bool | None = None

    @property
    def needs_values(self) -> bool:
        return "values" in self.inputs

    @property
    def needs_groups(self) -> bool:
        return "group" in self.inputs


CRITIC = ("rewards", "values", "mask", "gamma", "lam")
OUTCOME = ("scores", "group", "mask")

ESTIMATORS: dict[str, Estimator] = {
    "td": Estimator(td_advantages, CRITIC),
    "mc": Estimator(mc_advantages, CRITIC),
    "gae": Estimator(gae_advantages, CRITIC),
    "grpo": Estimator(grpo_advantages, OUTCOME, whiten=False),
    "dr_grpo": Estimator(dr_grpo_advantages, OUTCOME, whiten=False),
    "rloo": Estimator(rloo_advantages, OUTCOME, whiten=False),
    "reinforce++": Estimator(reinforce_pp_advantages, ("rewards", "mask", "gamma"), whiten=True),
    "reinforce++_baseline": Estimator(
        reinforce_pp_baseline_advantages,
        ("rewards", "scores", "group", "mask", "gamma"),
        whiten=True,
    ),
}


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(ESTIMATORS)}"
        ) from None


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    scores: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by name; returns (advantages, returns), both (B, T). Each estimator gets the
    arguments its registry entry names (``Estimator.inputs``)."""
    est = get_estimator(estimator)
    given = {
        "rewards": rewards,
        "values": values,
        "mask": mask,
        "gamma": gamma,
        "lam": lam,
        "scores": scores,
        "group": group,
    }
    missing = [k for k in est.inputs if given[k] is None]
    if missing:
        raise ValueError(f"advantage estimator {estimator!r} needs {missing}")
    return est.fn(**{k: given[k] for k in est.inputs})
