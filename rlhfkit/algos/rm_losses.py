"""Reward-model losses (the seed's RM stage).

Bradley-Terry pairwise loss (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020):
    L = -log sigmoid(r_chosen - r_rejected - m)          m: optional margin (Llama 2, sec. 3.2.2)
K-way ranking loss (InstructGPT eq. 1): every one of the C(K, 2) ordered pairs of a ranked list,
averaged per prompt so that a prompt with many responses does not dominate the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """chosen, rejected, margin: (B,) rewards. Returns the mean loss and accuracy / margin stats."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        stats = {
            "accuracy": pairwise_accuracy(chosen, rejected),
            "margin": (chosen - rejected).mean(),
        }
    return loss, stats


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked correctly; a tie counts as half right (random guess)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def ranking_loss(
    rewards: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """K-way loss over all pairs (i, j), i ranked above j.

    rewards: (B, K) scores of the responses, sorted best first along K.
    valid:   (B, K) bool, False for padding when prompts have fewer than K responses.
    """
    k = rewards.shape[1]
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    pair = upper & valid[:, :, None] & valid[:, None, :]  # (B, K, K), i above j
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    nll = torch.where(pair, -F.logsigmoid(diff), zero)
    n_pairs = pair.sum(dim=(1, 2)).to(rewards.dtype)  # C(K_b, 2)
    per_prompt = nll.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    has = (n_pairs > 0).to(rewards.dtype)
    loss = (per_prompt * has).sum() / has.sum().clamp(
        min=1
    )  # prompts with < 2 responses do not count
    with torch.no_grad():
        right = torch.where(
            pair, (diff > 0).to(rewards.dtype) + 0.5 * (diff == 0).to(rewards.dtype), zero
        )
        stats = {"accuracy": right.sum() / n_pairs.sum().clamp(min=1)}
    return loss, stats
