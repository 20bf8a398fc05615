"""Per-token rewards from the seed (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2):

    r_t = -beta * KL_t                  for every response token t < T
    r_T = R_final + (-beta * KL_T)      at the last response token T
    r_t = 0                             after the end (padding)

T is the EOS token, or the last kept token of a truncated response.
"""

from __future__ import annotations

import torch

from rlhfkit.algos.masking import last_index


def shape_rewards(
    kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combine per-token KL and a per-sequence score into per-token rewards.

    kl:     (B, T) per-token KL estimate KL_t (garbage allowed where mask == 0)
    scores: (B,)   R_final, the reward model's (or a reward function's) score
    mask:   (B, T) right-padded response mask
    returns rewards (B, T) and stats: non_score_reward (B,) = sum_t -beta*KL_t, kl_sum (B,)
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    non_score = torch.where(m, -kl_coef * kl, zero)  # (B, T)
    rewards = non_score.clone()
    last = last_index(mask)  # (B,)
    has_tokens = m.any(dim=1).to(scores.dtype)
    rewards.scatter_add_(1, last[:, None], (scores * has_tokens)[:, None].to(rewards.dtype))
    stats = {"non_score_reward": non_score.sum(1), "kl_sum": torch.where(m, kl, zero).sum(1)}
    return rewards, stats


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to R_final, (B,):

        0                                    if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
        -1                                   if |y| > L_max

    times ``penalty``. lengths (B,) response tokens; L_max = ``max_length`` (max_new_tokens),
    L_cache = ``buffer``; ``buffer`` 0 turns it off."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    n = lengths.to(torch.float32)
    start = max_length - buffer
    soft = (start - n) / buffer
    out = torch.where(n <= start, torch.zeros_like(n), soft)
    return penalty * torch.where(n > max_length, torch.full_like(n, -1.0), out)
