"""The RL core's two steps after a rollout: rewards and advantages, then the update.

    advantages   r_t = -beta KL_t (+ R_final at the end), then the registered estimator
                 (td/mc/gae with a critic, or the critic-free family), whitened as it says
    rl_update    epochs x minibatches x micro-batches of one policy loss (clipped surrogate,
                 optional clip-higher / dual clip, KL in the loss or not, entropy bonus), plus the
                 value loss when the learner has a critic

Both work for every learner mode of ``rl.critics`` and every estimator of ``algos.ESTIMATORS``.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.algos import (
    POLICY_LOSSES,
    aggregate,
    compute_advantages,
    entropy_bonus,
    explained_variance,
    get_estimator,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    pack_left,
    pack_like,
    rollout_correction_weights,
    shape_rewards,
    unpack,
    value_loss,
)
from rlhfkit.config import PPOAlgoConfig, PPOConfig
from rlhfkit.models import autocast
from rlhfkit.rollout.collect import fixed_layout, packs
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.forward import join
from rlhfkit.train import dist


def advantages(exp: Experience, kl_coef: float, pc: PPOAlgoConfig) -> dict[str, float]:
    """Fill ``exp.rewards``, ``exp.advantages`` and ``exp.returns``; returns the logged statistics
    (averaged over ranks). With ``kl_in: loss`` the KL leaves the rewards (it enters the loss).

    Everything runs over the model's own tokens (``exp.loss_mask``), packed to the front of each
    row: an environment's tokens in a multi-turn episode are transparent, so the recursions of
    GAE and REINFORCE++ step from the last token of one model turn to the first of the next, and
    R_final sits at the model's last token (docs/algorithms.md, "Multi-turn episodes")."""
    est = get_estimator(pc.estimator)
    kl = kl_penalty(exp.logprobs, exp.ref_logprobs, pc.kl_estimator)  # (B, T)
    kl, m, order = pack_left(kl, exp.loss_mask)  # identity for a single-turn response
    values = None if exp.values is None else pack_like(exp.values, order, m)
    reward_kl_coef = kl_coef if pc.kl_in == "reward" else 0.0
    rewards, rstats = shape_rewards(kl, exp.scores, m, reward_kl_coef)
    if exp.turn_rewards is not None:  # env.reward_at: turn, at each model turn's last token
        rewards = rewards + pack_like(exp.turn_rewards, order, m)
    # an estimator that reads only per-response scores gets the sequence reward sum_t r_t =
    # R_final - beta sum_t KL_t, so the reward-side KL penalty reaches it (TRL's RLOO and
    # OpenRLHF do the same); with kl_in: loss that is R_final alone
    outcome_only = "rewards" not in est.inputs
    scores = rewards.sum(1) if outcome_only else exp.scores  # (B,)
    adv, returns = compute_advantages(
        pc.estimator, rewards, values, m, pc.gamma, pc.lam, scores=scores, group=exp.group
    )
    whiten = pc.whiten_advantages if est.whiten is None else est.whiten
    final = adv
    if whiten:  # statistics over the whole buffer, all ranks together
        mean, var = dist.global_masked_moments(adv, m)
        final = masked_whiten(adv, m, mean=mean, var=var)
    exp.rewards, exp.advantages, exp.returns = (unpack(x, order) for x in (rewards, final, returns))
    stats = {
        "kl/seq_mean": float(rstats["kl_sum"].mean()),
        "reward/non_score": float(rstats["non_score_reward"].mean()),  # 0 with kl_in: loss
        "reward/total": float(rewards.sum(1).mean()),
        "adv/mean": float(masked_mean(adv, m)),
        "adv/std": float(masked_var(adv, m).sqrt()),
    }
    if values is not None:
        stats["value/explained_var"] = float(explained_variance(values, returns, m))
        stats["value/mean"] = float(masked_mean(values, m))
    return dist.mean_over_ranks(stats)


def minibatch_denominator(exp: Experience, aggregation: str, budget: int) -> torch.Tensor:
    """What the loss of a whole minibatch (all ranks) is divided by, over the number of ranks:
    each micro-batch's loss sum over this, summed and averaged by DDP, is exactly the minibatch
    loss (``algos.aggregate``'s ``denominator``). token: response tokens; sequence: non-empty
    sequences; token_sum_norm: sequences x ``budget`` (Dr. GRPO's constant: the most tokens a
    row can hold, ``PPOConfig.token_budget``: max_new_tokens, or an episode's max_total_tokens).
    Only the model's own tokens count (``loss_mask``)."""
    m = exp.loss_mask
    if aggregation == "token":
        count = m.sum()
    elif aggregation == "sequence":
        count = m.any(dim=1).sum()
    else:
        count = torch.tensor(m.shape[0] * budget, device=m.device)
    return (dist.all_reduce_sum(count.double()) / dist.world()).clamp(min=1).float()


def policy_loss_knobs(pc: PPOAlgoConfig) -> dict[str, float | None]:
    """The epsilons of ``ppo.policy_loss``, each loss with its own keys (docs/config.md)."""
    return {
        "ppo": {
            "clip_eps": pc.clip_eps,
            "clip_eps_high": pc.clip_eps_high,
            "dual_clip": pc.dual_clip or None,
        },
        "gspo": {"clip_eps": pc.gspo_clip_eps, "clip_eps_high": pc.gspo_clip_eps_high},
        "cispo": {"clip_eps_high": pc.cispo_clip_eps_high},
    }[pc.policy_loss]


def corrected_advantages(mb: Experience, pc: PPOAlgoConfig) -> tuple[torch.Tensor, dict]:
    """The advantages the policy loss sees: as they are, or times the rollout correction's
    weights (``ppo.rollout_correction``: the sampler's logprobs against pi_old)."""
    if pc.rollout_correction == "none":
        return mb.advantages, {}
    w, cstats = rollout_correction_weights(
        mb.logprobs, mb.sampler_logprobs, mb.loss_mask, pc.rollout_correction,
        pc.rollout_correction_cap,
    )  # fmt: skip
    stats = {"correction/mismatch": float(cstats["mismatch"])}
    stats["correction/capped"] = float(cstats["capped"])
    return mb.advantages * w, stats


def micro_step(
    learner,
    mb: Experience,
    pc: PPOAlgoConfig,
    temperature: float,
    kl_coef: float,
    update_actor: bool,
    denom: torch.Tensor,
    dtype: str = "fp32",
    packed: bool = False,
) -> dict[str, float]:
    """Forward + backward of one micro-batch: the policy loss (after the critic warm-up), with the
    entropy bonus and, with ``kl_in: loss``, beta KL_t; plus the value loss if there is a critic.
    ``dtype``: ``model.dtype``; bf16-mixed runs the forward under autocast, the losses in fp32.
    ``packed``: the policy's forward on the real tokens alone (``model.padding_free``)."""
    seq = join(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask, packed)
    m = mb.loss_mask  # the model's own tokens: an environment's get no loss, KL or entropy
    with_entropy = update_actor and pc.ent_coef > 0
    with autocast(dtype, m.device):
        logp, ent, v = learner.train_outputs(seq, temperature, with_entropy, update_actor)
    loss, stats, agg = torch.zeros((), device=m.device), {}, pc.loss_aggregation()
    if v is not None:
        vf, vstats = value_loss(v, mb.values, mb.returns, m, pc.value_clip_eps or None, agg, denom)
        loss = loss + pc.vf_coef * vf
        stats["loss/value"] = float(vf.detach())
        stats["value/clip_frac"] = float(vstats["value_clip_frac"])
    if update_actor:
        adv, cstats = corrected_advantages(mb, pc)
        pg, pstats = POLICY_LOSSES[pc.policy_loss](
            logp,
            mb.logprobs,
            adv,
            m,
            aggregation=agg,
            denominator=denom,
            **policy_loss_knobs(pc),
        )
        stats.update(cstats)
        loss = loss + pg
        if with_entropy:
            ent_term = entropy_bonus(ent, m, agg, denom)
            loss = loss - pc.ent_coef * ent_term
            stats["loss/entropy"] = float(ent_term.detach())
        if pc.kl_in == "loss":  # GRPO's form: + beta KL(pi_theta || pi_ref) in the loss
            kl = aggregate(kl_penalty(logp, mb.ref_logprobs, pc.kl_estimator), m, agg, denom)
            loss = loss + kl_coef * kl
            stats["loss/kl"] = float(kl.detach())
        stats.update(
            {
                "loss/policy": float(pg.detach()),
                "policy/clip_frac": float(pstats["clip_frac"]),
                "policy/approx_kl": float(pstats["approx_kl"]),
                "policy/ratio_mean": float(pstats["ratio_mean"]),
            }
        )
    loss.backward()  # actor and critic losses together (separate models: disjoint gradients)
    return stats


def by_length(idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A minibatch's rows ordered by response length, so that each micro-batch holds rows of
    similar length and ``Experience.select`` trims it to its own longest row: less padding in
    the update's forwards when lengths vary (RLVR, agents). The minibatch's loss is a sum of
    micro-batch sums over one global denominator, so the order changes it only by fp32
    rounding (tested). Stable, so equal lengths keep their shuffled order."""
    return idx[torch.argsort(lengths[idx], stable=True)]


def rl_update(
    learner,
    exp: Experience,
    cfg: PPOConfig,
    kl_coef: float,
    update_actor: bool,
    guard=None,
    length_buckets: bool = True,
) -> dict[str, float]:
    """``ppo.epochs`` epochs of shuffled minibatches over this rank's buffer, each accumulated over
    micro-batches before one optimizer step per optimizer. Returns the mean statistics.
    ``length_buckets``: micro-batches of similar lengths (``by_length``; fp32 only, where the
    layout does not matter beyond rounding)."""
    pc, temperature, budget = cfg.ppo, cfg.rollout.temperature, cfg.token_budget()
    acc: dict[str, list[float]] = {}
    per_rank_mb = pc.minibatch_size // dist.world()
    per_rank_micro = max(pc.micro_batch_size // dist.world(), 1)
    trim = not fixed_layout(cfg.model.dtype)  # below fp32 keep the rollout's layout
    lengths = exp.response_mask.sum(1)  # (B,)
    for _ in range(pc.epochs):
        perm = torch.randperm(len(exp))
        for start in range(0, len(exp), per_rank_mb):
            mb_idx = perm[start : start + per_rank_mb]
            if trim and length_buckets:
                mb_idx = by_length(mb_idx, lengths)
            denom = minibatch_denominator(exp.select(mb_idx), pc.loss_aggregation(), budget)
            sums: dict[str, float] = {}
            for j in range(0, len(mb_idx), per_rank_micro):
                mb = exp.select(mb_idx[j : j + per_rank_micro], trim)
                stats = micro_step(
                    learner, mb, pc, temperature, kl_coef, update_actor, denom, cfg.model.dtype,
                    packs(cfg.model),
                )  # fmt: skip
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            n_micro = math.ceil(len(mb_idx) / per_rank_micro)
            for k, v in sums.items():  # losses are partial sums: their total is the minibatch's
                acc.setdefault(k, []).append(v if k.startswith("loss/") else v / n_micro)
            for k, v in learner.step(update_actor, guard).items():
                acc.setdefault(k, []).append(v)
    learner.optims.end_iteration()
    return dist.mean_over_ranks({k: sum(v) / len(v) for k, v in acc.items()})
