"""Direct preference losses on sequence log-probabilities (no reward model, no sampling).

All take the summed completion log-probabilities (B,) of the chosen and rejected responses
under the policy and the frozen reference, and work on

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

beta convention: ``beta`` is the KL-regularisation strength of DPO's objective
max E[r] - beta KL(pi || ref); the implicit reward of a response is beta (log pi - log ref).
For IPO the same slot holds IPO's tau (Azar et al. 2023 write the regulariser as tau), and the
loss regresses h onto 1 / (2 tau).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLoss = Literal["sigmoid", "cdpo", "ipo"]


def dpo_log_ratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h (B,): how much more the policy than the reference prefers the chosen response."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: DPOLoss = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean preference loss over B pairs, and detached statistics.

    sigmoid  -log sigmoid(beta h)                                  Rafailov et al. 2023, eq. 7 (DPO)
    cdpo     -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             (labels flipped with probability eps)                  Mitchell 2023, "A note on DPO
                                                                    with noisy preferences" (cDPO)
    ipo      (h - 1 / (2 beta))^2, beta = IPO's tau                 Azar et al. 2023, eq. 17 (IPO)

    stats: chosen_reward / rejected_reward = beta (log pi - log ref) (B,), accuracy (share of
    pairs whose chosen implicit reward is the larger), margin (mean reward difference).
    """
    h = dpo_log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * h)
    elif loss == "cdpo":
        eps = label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; expected 'sigmoid', 'cdpo' or 'ipo'")
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen)
        rejected = beta * (policy_rejected - ref_rejected)
        stats = {
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
            "accuracy": (chosen > rejected).to(h.dtype).mean(),
            "margin": (chosen - rejected).mean(),
        }
    return per_pair.mean(), stats
