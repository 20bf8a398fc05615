"""Advantage estimators from the seed, each returning (advantages, returns).

rewards, values, mask are (B, T), right-padded; V(s_t) past the end is 0 (the episode is over).
``returns`` are the value targets: returns = advantages + values, which is
    td:  r_t + gamma V(s_{t+1})             (one-step TD target)
    mc:  sum_k gamma^k r_{t+k}              (Monte Carlo return)
    gae: lambda-return                      (Schulman et al. 2016, eq. 16)

GAE interpolates: lambda = 0 gives td, lambda = 1 gives mc.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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


ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "td": td_advantages,
    "mc": mc_advantages,
    "gae": gae_advantages,
}


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by name (``td``, ``mc`` or ``gae``); returns (advantages, returns), both (B, T)."""
    try:
        fn = ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}"
        ) from None
    return fn(rewards, values, mask, gamma, lam)
