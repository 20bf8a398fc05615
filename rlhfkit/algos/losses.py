"""PPO losses (the seed's step 3). Each returns (loss, stats); stats are detached tensors.

aggregation:
    "token":    sum over all tokens / number of tokens (long responses weigh more; DAPO, OpenRLHF)
    "sequence": mean over sequences of each sequence's token mean (the original PPO-for-LM form)
    "token_sum_norm": sum over all tokens / a constant, (max response length) x (sequences):
                the length-unbiased form of Dr. GRPO (Liu et al. 2025, sec. 3.2)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rlhfkit.algos.stats import masked_mean, masked_sum

Aggregation = Literal["token", "sequence", "token_sum_norm"]


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token quantity to a scalar over the masked positions.

    denominator: what the sum is divided by: by default the number of masked tokens ("token") or
    of non-empty sequences ("sequence") in this batch. Gradient accumulation and data parallelism
    pass the count of the whole minibatch instead, so that summing the pieces gives the loss of
    the whole minibatch exactly.
    """
    m = mask.bool()
    if aggregation == "token":
        total = masked_sum(per_token, m)
        count = m.sum()
    elif aggregation == "sequence":
        per_seq = masked_mean(per_token, m, dim=1)  # (B,)
        total = per_seq.sum()  # empty rows contribute 0
        count = m.any(dim=1).sum()  # and do not count
    elif aggregation == "token_sum_norm":
        # a constant: B x T of this batch; the update passes B x max_new_tokens of the minibatch
        total = masked_sum(per_token, m)
        count = torch.tensor(m.numel(), device=m.device)
    else:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; expected 'token', 'sequence' or 'token_sum_norm'"
        )
    if denominator is None:
        denominator = count.clamp(min=1)
    return total / denominator


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    aggregation: Aggregation = "token",
    denominator: float | torch.Tensor | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, negated for minimisation (Schulman et al. 2017, eq. 7):

        L = -E[min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)],  rho_t = pi_theta / pi_old

    eps_low = clip_eps; eps_high = clip_eps_high or clip_eps (asymmetric "clip-higher": DAPO,
    Yu et al. 2025, sec. 3.1). dual_clip = c > 1 also bounds the loss of a negative advantage
    by -c A_t, so a huge ratio on a bad token cannot dominate (Ye et al. 2020, "Mastering
    Complex Control in MOBA Games with Deep RL", eq. 5).

    logprobs (B, T) log pi_theta (with grad); old_logprobs, advantages (B, T) from the rollout.
    stats: clip_frac (share of tokens where the clipped term is chosen), approx_kl (k3 of
    pi_old vs pi_theta, Schulman's low-variance estimator), ratio_mean.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)  # garbage in pads must not reach exp
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.min(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(
            advantages < 0, torch.min(per_token, -dual_clip * advantages), per_token
        )
    loss = aggregate(torch.where(m, per_token, zero), mask, aggregation, denominator)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    aggregation: Aggregation = "token",
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's critic loss E[(V_phi(s_t) - V_target)^2], optionally clipped around the old values.

    With clip_eps, V_clip = old + clip(V - old, -eps, eps) and the loss is the elementwise max of
    the two squared errors (PPO2 baselines; Andrychowicz et al. 2021 find it rarely helps).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    m = mask.bool()
    err = (values - returns) ** 2
    if clip_eps is None:
        per_token, clip_frac = err, torch.zeros((), device=values.device)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.max(err, err_clip)
        clip_frac = masked_mean((err_clip > err).to(values.dtype), mask).detach()
    loss = aggregate(torch.where(m, per_token, zero), mask, aggregation, denominator)
    return loss, {"value_clip_frac": clip_frac}


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """S = E[-sum_a pi(a|s_t) log pi(a|s_t)], aggregated like the other losses. Add ``-ent_coef * S``."""
    zero = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
    return aggregate(torch.where(mask.bool(), entropy, zero), mask, aggregation, denominator)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    aggregation: Aggregation = "sequence",
    denominator: float | torch.Tensor | None = None,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO, sequence-level clipped surrogate (Zheng et al. 2025, "Group Sequence Policy
    Optimization", eqs. 5-7 and the GSPO-token form, eq. 13):

        s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean_t log rho_{i,t})
        L   = -E[min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)]

    The ratio is one per response, clipped as a whole, with its own (much smaller) epsilons: the
    paper uses 3e-4 and 4e-4. Written in the GSPO-token form, s_{i,t} = sg[s_i] pi_theta(y_t) /
    sg[pi_theta(y_t)]: its value is s_i at every token, and with an advantage constant over the
    response (every outcome estimator) its gradient is GSPO's; the per-token terms are then
    aggregated like the other losses ("sequence" is the paper's 1/G sum_i of a response mean).

    logprobs (B, T) with grad; old_logprobs, advantages (B, T). stats: clip_frac (share of
    responses clipped), ratio_mean (mean s_i over responses), approx_kl (token k3, as ppo's).
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)  # (B, T)
    n = m.sum(1).clamp(min=1)  # (B,)
    seq_log_ratio = log_ratio.sum(1) / n  # (B,) log s_i
    # value s_i at every token, gradient through each token's own logprob: d s_{i,t} = s_i d log pi_t
    token_log_s = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()  # (B, T)
    s = torch.exp(token_log_s)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = s * advantages
    clipped = torch.clamp(s, 1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.min(unclipped, clipped)
    loss = aggregate(torch.where(m, per_token, zero), mask, aggregation, denominator)
    with torch.no_grad():
        rows = m.any(1)
        seq_s = torch.exp(seq_log_ratio)
        seq_clipped = (seq_s < 1.0 - clip_eps) | (seq_s > 1.0 + high)
        stats = {
            "clip_frac": seq_clipped[rows].to(logprobs.dtype).mean()
            if rows.any()
            else zero.detach(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": seq_s[rows].mean() if rows.any() else zero.detach() + 1,
        }
    return loss, stats


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_high: float,
    aggregation: Aggregation = "token",
    denominator: float | torch.Tensor | None = None,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO, the clipped importance-sampling-weight policy gradient (MiniMax, 2025, "MiniMax-M1",
    sec. 3.1, eq. 4):

        L = -E[ sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A_t log pi_theta(a_t|s_t) ]

    Unlike the clipped surrogate, no token loses its gradient: the weight is clipped and held
    constant, the log-probability still moves. MiniMax sets no lower bound (``clip_eps`` None)
    and tunes only the upper one. The gradient is sg(w_t) A_t grad log pi_t, which at rho = 1
    equals the clipped surrogate's.

    logprobs (B, T) with grad; old_logprobs, advantages (B, T). stats: clip_frac (share of tokens
    whose weight was capped), approx_kl, ratio_mean.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    low = 0.0 if clip_eps is None else 1.0 - clip_eps
    weight = torch.clamp(ratio, low, 1.0 + clip_eps_high).detach()
    per_token = -weight * advantages * torch.where(m, logprobs, zero)
    loss = aggregate(torch.where(m, per_token, zero), mask, aggregation, denominator)
    with torch.no_grad():
        capped = (ratio > 1.0 + clip_eps_high) | (ratio < low)
        stats = {
            "clip_frac": masked_mean(capped.to(logprobs.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


# the policy losses by ``ppo.policy_loss``; each takes (logprobs, old_logprobs, advantages, mask)
# and its own epsilons as keywords (rl.update passes them from the config)
POLICY_LOSSES = {"ppo": policy_loss, "gspo": gspo_loss, "cispo": cispo_loss}


def rollout_correction_weights(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: Literal["tis", "mis"],
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights for the gap between the sampler and the trainer's pi_old (Yao et al.
    2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl's and
    TRL's rollout correction), detached, (B, T), 0 at padding:

        tis:  w_t = min(rho_t, C),                       rho_t = pi_old(a_t) / pi_sampler(a_t)
        mis:  w_i = rho_i if rho_i <= C else 0,           rho_i = prod_t rho_t (the response's)

    The policy loss's advantages are multiplied by w: for a weight w >= 0, min(r wA, clip(r) wA)
    = w min(r A, clip(r) A), so the clipped surrogate (and GSPO's and CISPO's) becomes the
    weighted one. stats: mismatch (mean |log rho_t| over tokens), capped (share of tokens (tis)
    or responses (mis) the cap changed)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
    log_rho = torch.where(m, old_logprobs - sampler_logprobs, zero).detach()  # (B, T)
    if mode == "tis":
        rho = torch.exp(log_rho)
        w = torch.clamp(rho, max=cap)
        capped = masked_mean((rho > cap).to(rho.dtype), mask)
    elif mode == "mis":
        seq = log_rho.sum(1)  # (B,) log rho_i
        keep = seq <= math.log(cap)
        w = torch.where(keep, torch.exp(seq), zero)[:, None].expand_as(log_rho)
        rows = m.any(1)
        capped = (~keep[rows]).to(log_rho.dtype).mean() if rows.any() else zero
    else:
        raise ValueError(f"unknown rollout correction {mode!r}; expected 'tis' or 'mis'")
    stats = {"mismatch": masked_mean(log_rho.abs(), mask), "capped": capped}
    return torch.where(m, w, zero), stats
