"""Pure RLHF/PPO math: tensors and floats in, (tensor, stats) out. Imports torch only.

Each function is listed with its equation and paper in docs/algorithms.md.
"""

from rlhfkit.algos.advantages import (
    ESTIMATORS,
    Estimator,
    compute_advantages,
    dr_grpo_advantages,
    gae_advantages,
    get_estimator,
    group_moments,
    grpo_advantages,
    mc_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    td_advantages,
)
from rlhfkit.algos.dpo import dpo_log_ratio_margin, dpo_loss
from rlhfkit.algos.kl import kl_penalty
from rlhfkit.algos.kl_control import AdaptiveKLController, FixedKLController
from rlhfkit.algos.logprobs import full_kl_from_logits, logprobs_and_entropy, token_logprobs
from rlhfkit.algos.losses import (
    POLICY_LOSSES,
    aggregate,
    cispo_loss,
    entropy_bonus,
    gspo_loss,
    policy_loss,
    rollout_correction_weights,
    value_loss,
)
from rlhfkit.algos.masking import (
    last_index,
    pack_left,
    pack_like,
    position_ids,
    response_mask,
    unpack,
)
from rlhfkit.algos.rewards import overlong_penalty, shape_rewards
from rlhfkit.algos.rm_losses import pairwise_accuracy, pairwise_loss, ranking_loss
from rlhfkit.algos.stats import (
    RunningMeanStd,
    clip_abs,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "POLICY_LOSSES",
    "cispo_loss",
    "gspo_loss",
    "overlong_penalty",
    "rollout_correction_weights",
    "ESTIMATORS",
    "Estimator",
    "dpo_log_ratio_margin",
    "dpo_loss",
    "dr_grpo_advantages",
    "get_estimator",
    "group_moments",
    "grpo_advantages",
    "position_ids",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMeanStd",
    "aggregate",
    "clip_abs",
    "compute_advantages",
    "entropy_bonus",
    "explained_variance",
    "full_kl_from_logits",
    "gae_advantages",
    "kl_penalty",
    "last_index",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mc_advantages",
    "pairwise_accuracy",
    "pairwise_loss",
    "policy_loss",
    "ranking_loss",
    "response_mask",
    "pack_left",
    "pack_like",
    "unpack",
    "shape_rewards",
    "td_advantages",
    "token_logprobs",
    "value_loss",
]
