"""Stage 3 of the seed: PPO with four models (actor, critic, reference, reward model).

Each iteration reads like the seed:
    1. rollout     the actor samples responses; we record log pi, log pi_ref, V(s_t), R_final
    2. rewards     r_t = -beta KL_t, plus R_final at the last token
    3. advantages  td / mc / gae, and the returns (value targets)
    4. update      clipped surrogate + value loss (+ entropy bonus), N epochs of minibatches
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clip_abs,
    compute_advantages,
    entropy_bonus,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)
from rlhfkit.config import ConfigError, LoraConfig, PPOConfig, to_dict
from rlhfkit.data.build import PromptItem, load_prompts
from rlhfkit.data.tokenize import pad_left
from rlhfkit.models import (
    ActorCritic,
    PerTokenScalar,
    device_of,
    export_model,
    export_shared_critic,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    load_value_head,
    read_reward_stats,
    save_value_head,
    shared_state,
    write_trainable,
)
from rlhfkit.rollout.experience import Experience, concat
from rlhfkit.rollout.forward import (
    actor_critic_outputs,
    critic_values,
    join,
    policy_logprobs,
    reward_scores,
)
from rlhfkit.rollout.rewards import RewardFn, call_reward_fn, decode_texts, load_reward_fn
from rlhfkit.rollout.sampling import generate
from rlhfkit.stages.common import (
    export_final,
    find_resume,
    load_trainable_policy,
    load_trainable_scalar,
    setup_run,
)
from rlhfkit.train import dist
from rlhfkit.train.checkpoint import rng_state, save_checkpoint, set_rng_state, write_atomic_dir
from rlhfkit.train.guard import NonFiniteGuard, StopOnSignal, StopRequested, finite
from rlhfkit.train.logger import MetricLogger
from rlhfkit.train.optim import clip_and_step, make_optimizer


@dataclass
class Models:
    tokenizer: Any
    actor: Any  # pi_theta, trained
    critic: Any | None  # V_phi, trained: a sequence-classification model; None with a shared trunk
    ref: Any | None  # pi_SFT, frozen; None = the LoRA actor with adapters disabled
    rm: Any | None  # frozen PerTokenScalar; None when a Python reward function scores instead
    reward_fn: RewardFn | None
    shared: ActorCritic | None = None  # shared trunk: the actor plus a value head
    critic_fwd: Any = None  # PerTokenScalar(critic): V(s) at every position

    def __post_init__(self) -> None:
        if self.critic_fwd is None and self.critic is not None:
            self.critic_fwd = PerTokenScalar(self.critic)


class PromptStream:
    """Prompts in a seeded order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        return torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        ).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.index = s["epoch"], s["index"]
        self._order = self._perm()


class ScoreNormalizer:
    """R_final -> (R - mean) / std with the RM's stored reference statistics or running ones, then clip."""

    def __init__(self, mode: str, rm_stats: dict[str, float] | None, clip: float):
        self.mode = "running" if (mode == "rm_stats" and rm_stats is None) else mode
        self.rm_stats, self.clip, self.running = rm_stats, clip, RunningMeanStd()

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            x = raw
        elif self.mode == "rm_stats":
            x = (raw - self.rm_stats["mean"]) / max(self.rm_stats["std"], 1e-8)
        else:
            # moments over all ranks, so every rank keeps the same running statistics
            r = raw.detach().double()
            n = dist.all_reduce_sum(torch.tensor(float(r.numel()), dtype=torch.float64))
            mean = dist.all_reduce_sum(r.sum()) / n
            var = dist.all_reduce_sum(((r - mean) ** 2).sum()) / n
            self.running.update_from_moments(float(mean), float(var), float(n))
            x = self.running.normalize(raw)
        return clip_abs(x, self.clip or None)


# --------------------------------------------------------------------------- models


def load_models(cfg: PPOConfig, ckpt: Path | None, reward_fn: RewardFn | None) -> Models:
    tok = load_tokenizer(cfg.model)
    sft = cfg.model.name_or_path
    actor = load_trainable_policy(cfg.model, tok, ckpt / "actor" if ckpt else None)
    frozen_cfg = dataclasses.replace(cfg.model, lora=LoraConfig(), gradient_checkpointing=False)
    # with LoRA, pi_ref is the actor with its adapters disabled: no second copy of the weights
    ref = None if cfg.model.lora.enabled else load_policy(frozen_cfg, tok, trainable=False)
    critic, shared = None, None
    if cfg.shared_trunk:  # V_phi = a fresh value head on the actor's own transformer
        shared = ActorCritic(actor)
        if ckpt is not None:
            load_value_head(shared.value_head, ckpt / "actor")
    else:
        critic = load_trainable_scalar(
            cfg.model,
            tok,
            ckpt / "critic" if ckpt else None,
            cfg.reward_model if cfg.critic_init == "rm" else sft,
            fresh_head=cfg.critic_init == "sft",
        )
    rm = None
    if cfg.reward_model:
        rm = PerTokenScalar(
            load_scalar_model(frozen_cfg, tok, cfg.reward_model, fresh_head=False, trainable=False)
        )
    elif reward_fn is None:
        reward_fn = load_reward_fn(cfg.reward_fn)
    for m in (actor, critic):
        if m is not None:
            m.train()  # dropout is off already; train() only matters for gradient checkpointing
    return Models(tok, actor, critic, ref, rm, reward_fn, shared)


# --------------------------------------------------------------------------- 1. rollout


def fixed_layout(actor) -> bool:
    """Below fp32, logprobs depend on the padding around a sequence (up to ~0.1 nats per token in
    bf16, issue 6), so the rollout's and the update's forwards must see each row in the same
    layout: prompts padded to the longest prompt of the data set, responses to max_new_tokens,
    and minibatches not trimmed. In fp32 the layout changes results only by rounding (~1e-6)."""
    return next(actor.parameters()).dtype != torch.float32


def _pad_generation(gen, width: int, pad_id: int):
    """Right-pad a ``Generation`` to ``width`` response columns (a fixed layout)."""
    extra = width - gen.tokens.shape[1]
    if extra <= 0:
        return gen
    pad = torch.nn.functional.pad
    return dataclasses.replace(
        gen,
        tokens=pad(gen.tokens, (0, extra), value=pad_id),
        logprobs=pad(gen.logprobs, (0, extra)),
        entropy=pad(gen.entropy, (0, extra)),
    )


def _logprobs_from_sampling(choice: str, actor) -> bool:
    """fp32 logprobs from the KV-cache sampler equal a full forward's to rounding; bf16 ones can
    differ by ~0.1 nats with the layout, which would bias the PPO ratio (issue 6)."""
    if choice != "auto":
        return choice == "sampling"
    return not fixed_layout(actor)


@torch.no_grad()
def rollout_chunk(
    models: Models,
    prompts: list[PromptItem],
    cfg: PPOConfig,
    normalize: ScoreNormalizer,
    timer: dict[str, float],
    prompt_width: int | None = None,
) -> Experience:
    """One chunk of episodes. ``prompt_width``: pad prompts to it (the fixed layout below fp32)."""
    tok, rc = models.tokenizer, cfg.rollout
    prompt_ids, prompt_mask = pad_left(
        [p.prompt_ids for p in prompts], tok.pad_token_id, device_of(models.actor), prompt_width
    )  # (B, P)
    t0 = time.perf_counter()
    with dist.full_weights(models.shared or models.actor):  # FSDP: no collectives per token
        gen = generate(
            models.actor,
            prompt_ids,
            prompt_mask,
            max_new_tokens=rc.max_new_tokens,
            eos_id=None if rc.ignore_eos else tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=rc.temperature,
            top_k=rc.top_k,
            top_p=rc.top_p,
            stop_sequences=[tok(s, add_special_tokens=False)["input_ids"] for s in rc.stop_strings],
            compile_decode=rc.compile,
        )
    t1 = time.perf_counter()
    if prompt_width is not None:  # fixed layout: every response is max_new_tokens columns wide
        gen = _pad_generation(gen, rc.max_new_tokens, tok.pad_token_id)
    seq = join(prompt_ids, prompt_mask, gen.tokens, gen.mask)
    if models.shared is not None:  # one trunk: log pi and V(s_t) from the same forward
        logprobs, entropy, values = actor_critic_outputs(
            models.shared, seq, rc.temperature, with_entropy=True
        )  # (B, T) each
    else:
        if _logprobs_from_sampling(rc.old_logprobs, models.actor):  # never recompute what we have
            logprobs, entropy = gen.logprobs, gen.entropy
        else:
            logprobs, entropy = policy_logprobs(
                models.actor, seq, rc.temperature, with_entropy=True
            )
        values = critic_values(models.critic_fwd, seq)  # (B, T)
    if models.ref is None:
        with models.actor.disable_adapter():
            ref_logprobs, _ = policy_logprobs(models.actor, seq, rc.temperature)
    else:
        ref_logprobs, _ = policy_logprobs(models.ref, seq, rc.temperature)
    if models.rm is not None:
        raw = reward_scores(models.rm, seq)  # (B,)
    else:
        texts = decode_texts(tok, prompt_ids, prompt_mask, gen.tokens, gen.mask)
        raw = call_reward_fn(models.reward_fn, *texts).to(prompt_ids.device)
    scores = normalize(raw) - rc.missing_eos_penalty * (~gen.stopped).float()
    timer["generate"] += t1 - t0
    timer["score"] += time.perf_counter() - t1
    timer["entropy_sum"] += float(masked_mean(entropy, gen.mask)) * len(prompts)
    return Experience(
        prompt_ids,
        prompt_mask,
        gen.tokens,
        gen.mask,
        logprobs,
        ref_logprobs,
        values,
        scores,
        raw,
        gen.stopped,
    )


def collect(
    models: Models,
    prompts: list[PromptItem],
    stream: PromptStream,
    cfg: PPOConfig,
    normalize: ScoreNormalizer,
    timer: dict[str, float],
) -> Experience:
    """Fill the experience buffer with ``episodes_per_iteration`` episodes, ``chunk_size`` at a time.
    Data-parallel: every rank reads the same prompt stream and generates its own slice of it."""
    models.actor.eval()
    n, r = dist.world(), dist.rank()
    width = max(len(p.prompt_ids) for p in prompts) if fixed_layout(models.actor) else None
    chunks, left = [], cfg.rollout.episodes_per_iteration // n
    while left > 0:
        k = min(cfg.rollout.chunk_size, left)
        mine = stream.take(k * n)[r * k : (r + 1) * k]
        chosen = [prompts[i] for i in mine]
        chunks.append(rollout_chunk(models, chosen, cfg, normalize, timer, width))
        left -= k
    models.actor.train()
    return concat(chunks, models.tokenizer.pad_token_id)


# --------------------------------------------------------------------------- 2-3. rewards, advantages


def rewards_and_advantages(exp: Experience, kl_coef: float, cfg: PPOConfig) -> dict[str, float]:
    pc, m = cfg.ppo, exp.response_mask
    kl = kl_penalty(exp.logprobs, exp.ref_logprobs, pc.kl_estimator)  # (B, T)
    exp.rewards, rstats = shape_rewards(kl, exp.scores, m, kl_coef)
    adv, exp.returns = compute_advantages(
        pc.estimator, exp.rewards, exp.values, m, pc.gamma, pc.lam
    )
    if pc.whiten_advantages:  # statistics over the whole buffer, all ranks together
        mean, var = dist.global_masked_moments(adv, m)
        exp.advantages = masked_whiten(adv, m, mean=mean, var=var)
    else:
        exp.advantages = adv
    return dist.mean_over_ranks(
        {
            "kl/seq_mean": float(rstats["kl_sum"].mean()),
            "reward/non_score": float(rstats["non_score_reward"].mean()),
            "reward/total": float(exp.rewards.sum(1).mean()),
            "adv/mean": float(masked_mean(adv, m)),
            "adv/std": float(masked_var(adv, m).sqrt()),
            "value/explained_var": float(explained_variance(exp.values, exp.returns, m)),
            "value/mean": float(masked_mean(exp.values, m)),
        }
    )


# --------------------------------------------------------------------------- 4. update


def _minibatch_denominator(exp: Experience, aggregation: str) -> torch.Tensor:
    """Tokens (or non-empty sequences) in the whole minibatch over all ranks, divided by the number
    of ranks: each micro-batch's loss sum over this, summed and averaged by DDP, is exactly the
    minibatch loss (algos.aggregate's ``denominator``)."""
    m = exp.response_mask
    count = m.sum() if aggregation == "token" else m.any(dim=1).sum()
    return (dist.all_reduce_sum(count.double()) / dist.world()).clamp(min=1).float()


def ppo_update(
    models: Models,
    optims: dict[str, Any],
    exp: Experience,
    cfg: PPOConfig,
    update_actor: bool,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """N epochs of shuffled minibatches over this rank's buffer. ``optims`` holds the training
    modules too (``actor_train`` / ``critic_train``: DDP-wrapped when data-parallel)."""
    pc = cfg.ppo
    acc: dict[str, list[float]] = {}
    per_rank_mb = pc.minibatch_size // dist.world()
    per_rank_micro = max(pc.micro_batch_size // dist.world(), 1)
    trim = not fixed_layout(models.actor)  # below fp32 keep the rollout's layout
    for _ in range(pc.epochs):
        perm = torch.randperm(len(exp))
        for start in range(0, len(exp), per_rank_mb):
            mb_idx = perm[start : start + per_rank_mb]
            denom = _minibatch_denominator(exp.select(mb_idx), pc.aggregation)
            sums: dict[str, float] = {}
            for j in range(0, len(mb_idx), per_rank_micro):
                mb = exp.select(mb_idx[j : j + per_rank_micro], trim)
                for k, v in _micro_step(optims, mb, cfg, update_actor, denom).items():
                    sums[k] = sums.get(k, 0.0) + v
            n_micro = math.ceil(len(mb_idx) / per_rank_micro)
            for k, v in sums.items():  # losses are partial sums: their total is the minibatch's
                acc.setdefault(k, []).append(v if k.startswith("loss/") else v / n_micro)
            for k, v in _optimizer_steps(models, optims, cfg, update_actor, guard).items():
                acc.setdefault(k, []).append(v)
    for name in ("actor", "critic"):
        if f"{name}_sched" in optims:
            optims[f"{name}_sched"].step()  # LR warm-up counts iterations
    return dist.mean_over_ranks({k: sum(v) / len(v) for k, v in acc.items()})


def _optimizer_steps(models, optims, cfg: PPOConfig, update_actor: bool, guard) -> dict[str, float]:
    """Clip and step after a minibatch's gradients are accumulated; returns the grad norms."""
    if models.shared is not None:  # one optimizer over trunk + value head
        if not update_actor:  # critic warm-up trains the value head only: drop the trunk's grads
            for p in models.shared.trunk_parameters():
                p.grad = None
        norm = clip_and_step(
            models.shared.parameters(),
            optims["actor"],
            None,
            cfg.actor.max_grad_norm,
            guard,
            where="actor-critic gradient",
        )
        return {"grad_norm/actor": float(norm)}
    out = {}
    for name, model, oc in (
        ("actor", models.actor, cfg.actor),
        ("critic", models.critic, cfg.critic),
    ):
        if name == "actor" and not update_actor:
            continue
        norm = clip_and_step(
            model.parameters(),
            optims[name],
            None,
            oc.max_grad_norm,
            guard,
            where=f"{name} gradient",
        )
        out[f"grad_norm/{name}"] = float(norm)
    return out


def _micro_step(
    optims, mb: Experience, cfg: PPOConfig, update_actor: bool, denom: torch.Tensor
) -> dict[str, float]:
    """Forward + backward of one micro-batch: clipped surrogate (+ entropy bonus) and value loss."""
    pc, temp = cfg.ppo, cfg.rollout.temperature
    seq = join(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    m = mb.response_mask
    with_entropy = update_actor and pc.ent_coef > 0
    if "critic_train" not in optims:  # shared trunk: one forward gives log pi and V
        logp, ent, v = actor_critic_outputs(optims["actor_train"], seq, temp, with_entropy)
    else:
        v = critic_values(optims["critic_train"], seq)
        if update_actor:
            logp, ent = policy_logprobs(optims["actor_train"], seq, temp, with_entropy)
    vf, vstats = value_loss(
        v, mb.values, mb.returns, m, pc.value_clip_eps or None, pc.aggregation, denom
    )
    loss = pc.vf_coef * vf
    stats = {"loss/value": float(vf.detach()), "value/clip_frac": float(vstats["value_clip_frac"])}
    if update_actor:
        pg, pstats = policy_loss(
            logp, mb.logprobs, mb.advantages, m, pc.clip_eps, pc.aggregation, denom
        )
        loss = loss + pg
        if with_entropy:
            ent_term = entropy_bonus(ent, m, pc.aggregation, denom)
            loss = loss - pc.ent_coef * ent_term
            stats["loss/entropy"] = float(ent_term.detach())
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


# --------------------------------------------------------------------------- one iteration


def ppo_iteration(
    models: Models,
    optims: dict[str, Any],
    prompts: list[PromptItem],
    stream: PromptStream,
    cfg: PPOConfig,
    normalize: ScoreNormalizer,
    kl_ctl,
    guard: NonFiniteGuard,
    it: int,
) -> tuple[Experience, dict[str, float]]:
    timer = {"generate": 0.0, "score": 0.0, "entropy_sum": 0.0}
    t_start = time.perf_counter()
    # 1. rollout: sample, and record log pi, log pi_ref, V(s_t) and R_final per episode
    exp = collect(models, prompts, stream, cfg, normalize, timer)
    # 2-3. rewards r_t = -beta KL_t (+ R_final at the end), advantages and returns
    beta = kl_ctl.value
    metrics = rewards_and_advantages(exp, beta, cfg)
    # 4. update: actor (after the critic warm-up) and critic; skipped if a reward is not finite
    t_up = time.perf_counter()
    if guard.check(finite(exp.rewards, exp.values), f"reward/value at iteration {it + 1}"):
        update_actor = it >= cfg.ppo.critic_warmup_iterations
        metrics.update(ppo_update(models, optims, exp, cfg, update_actor, guard))
        kl_ctl.update(
            metrics["kl/seq_mean"], len(exp) * dist.world()
        )  # global mean KL and episodes
    t_end = time.perf_counter()
    n_tokens = int(exp.response_mask.sum())
    rollout_stats = dist.mean_over_ranks(  # per-rank values averaged (std: mean of per-rank stds)
        {
            "score/mean": float(exp.raw_scores.mean()),
            "score/std": float(exp.raw_scores.std()),
            "score/normalized_mean": float(exp.scores.mean()),
            "policy/entropy": timer["entropy_sum"] / len(exp),
            "response/length": n_tokens / len(exp),
            "response/eos_rate": float(exp.stopped.float().mean()),
            "kl/beta": beta,
            "lr/actor": optims["actor"].param_groups[0]["lr"],
            "lr/critic": (optims.get("critic") or optims["actor"]).param_groups[-1]["lr"],
            "nonfinite/skipped": guard.skipped,
            "time/generate": timer["generate"],
            "time/score": timer["score"],
            "time/update": t_end - t_up,
            "time/iteration": t_end - t_start,
            "perf/tokens_per_s": n_tokens / (t_end - t_start),
        }
    )
    metrics.update(rollout_stats)
    return exp, metrics


def warn_if_exploding(metrics: dict[str, float], cfg: PPOConfig, iteration: int) -> None:
    """KL far above the usual range, or responses that all run to the length limit, usually mean
    the policy is exploiting the reward; say so before the run is wasted."""
    if metrics["kl/seq_mean"] > cfg.run.warn_kl:
        print(
            f"warning: iteration {iteration}: KL to the reference is {metrics['kl/seq_mean']:.1f} nats per "
            f"response (> run.warn_kl = {cfg.run.warn_kl}); consider a larger ppo.kl_coef",
            file=sys.stderr,
        )
    if not cfg.rollout.ignore_eos and metrics["response/eos_rate"] < 0.05:
        print(
            f"warning: iteration {iteration}: {1 - metrics['response/eos_rate']:.0%} of responses hit "
            f"max_new_tokens without EOS",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- the recipe


def _warmup(iterations: int):
    return lambda it: min(1.0, (it + 1) / iterations) if iterations else 1.0


def _training_modules(models: Models, cfg: PPOConfig) -> dict[str, Any]:
    """The modules the update calls: the models themselves in one process; DDP over them; or,
    with ``run.parallel: fsdp``, the models sharded in place (the frozen reference and RM too,
    since every rank runs their forwards in step)."""
    strategy = cfg.run.parallel
    if strategy == "fsdp":
        for frozen in (models.ref, models.rm):
            if frozen is not None:
                dist.shard(frozen)
    if models.shared is not None:
        train = {"actor_train": dist.wrap(models.shared, strategy)}
        if dist.is_sharded(models.shared):
            # FSDP2 makes the first module whose forward runs its root; generation calls the
            # policy inside, so one tiny forward through the actor-critic comes first
            with torch.no_grad():
                z = torch.zeros(1, 1, dtype=torch.long, device=device_of(models.actor))
                models.shared(z, torch.ones_like(z), z, logits_to_keep=1)
            models.shared.reshard()  # back to shards before the optimizer takes the parameters
        return train
    return {
        "actor_train": dist.wrap(models.actor, strategy),
        "critic_train": dist.wrap(models.critic_fwd, strategy),
    }


def _optimizers(models: Models, cfg: PPOConfig) -> dict[str, Any]:
    """Training modules (see ``_training_modules``), then the optimizers and LR schedules of the
    actor and the critic over their (possibly sharded) parameters."""
    out = _training_modules(models, cfg)
    betas = (0.9, 0.999)
    if models.shared is not None:  # one optimizer: the actor's lr on the trunk, the critic's on V
        ac, a, c = models.shared, cfg.actor, cfg.critic
        groups = [
            {"params": ac.trunk_parameters(), "lr": a.lr, "weight_decay": a.weight_decay},
            {"params": ac.value_head.parameters(), "lr": c.lr, "weight_decay": c.weight_decay},
        ]
        out["actor"] = opt = make_optimizer(groups, a.lr, a.weight_decay, betas)
        out["actor_sched"] = torch.optim.lr_scheduler.LambdaLR(
            opt, [_warmup(a.warmup_iterations), _warmup(c.warmup_iterations)]
        )
        return out
    for name, model, oc in (
        ("actor", models.actor, cfg.actor),
        ("critic", models.critic, cfg.critic),
    ):
        out[name] = opt = make_optimizer(model.parameters(), oc.lr, oc.weight_decay, betas)
        out[f"{name}_sched"] = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(oc.warmup_iterations))
    return out


def _owner(models: Models, name: str):
    """The module whose parameters optimizer ``name`` holds (for sharded state dicts)."""
    if name == "critic":
        return models.critic
    return models.shared if models.shared is not None else models.actor


def _sample_text(models: Models, exp: Experience, n: int = 3) -> str:
    prompts, responses = decode_texts(
        models.tokenizer,
        exp.prompt_ids[:n],
        exp.prompt_mask[:n],
        exp.response[:n],
        exp.response_mask[:n],
    )
    return "\n\n".join(
        f"PROMPT: {p}\nRESPONSE: {r}\nSCORE: {float(s):.3f}"
        for p, r, s in zip(prompts, responses, exp.raw_scores, strict=False)
    )


def run_ppo(
    cfg: PPOConfig, reward_fn: RewardFn | None = None, monitor: RewardFn | None = None
) -> Path:
    """Train; returns output_dir/final (the actor). ``monitor(prompts, responses)`` is an optional
    independent judge (e.g. the demo's gold scorer) whose mean is logged as ``score/gold`` per iteration."""
    if not (cfg.reward_model or cfg.reward_fn or reward_fn):
        raise ConfigError(
            "reward_model / reward_fn: set one of them (an RM directory or a Python reward)"
        )
    n = dist.world()
    if cfg.rollout.episodes_per_iteration % n or cfg.ppo.minibatch_size % n:
        raise ConfigError(
            f"rollout.episodes_per_iteration and ppo.minibatch_size must divide by the {n} ranks"
        )
    out = setup_run(cfg.run)
    ckpt, state = find_resume(cfg.run)
    models = load_models(cfg, ckpt, reward_fn)
    torch.manual_seed(cfg.run.seed + 1000 * dist.rank())  # ranks sample different responses
    prompts, report = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    print(report.line(), file=sys.stderr)
    stream = PromptStream(len(prompts), cfg.run.seed)
    pc = cfg.ppo
    kl_ctl = (
        AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
        if pc.adaptive_kl
        else FixedKLController(pc.kl_coef)
    )
    normalize = ScoreNormalizer(
        pc.reward_norm,
        read_reward_stats(cfg.reward_model) if cfg.reward_model else None,
        pc.reward_clip,
    )
    optims = _optimizers(models, cfg)
    stateful = [k for k in ("actor", "critic", "actor_sched", "critic_sched") if k in optims]
    start = 0
    if state is not None:
        for k in stateful:
            if k.endswith("_sched"):
                optims[k].load_state_dict(state[k])
            else:  # consolidated over ranks when FSDP-sharded
                dist.load_optimizer_state(_owner(models, k), optims[k], state[k])
        kl_ctl.load_state_dict(state["kl_ctl"])
        normalize.running.load_state_dict(state["running_scores"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"][dist.rank()])
        start = state["iteration"]
    logger = MetricLogger(out, cfg.log, to_dict(cfg), resume_step=start)

    def checkpoint(iteration: int) -> None:
        # collectives first (every rank): consolidated weights and optimizer states under FSDP
        st = {
            k: optims[k].state_dict()
            if k.endswith("_sched")
            else dist.optimizer_state(_owner(models, k), optims[k])
            for k in stateful
        }
        critic_w, head = None, None
        if models.shared is not None:
            actor_w, head = shared_state(models.shared, dist.full_state_dict(models.shared))
        else:
            actor_w, critic_w = (
                dist.full_state_dict(models.actor),
                dist.full_state_dict(models.critic),
            )
        st.update(
            kl_ctl=kl_ctl.state_dict(),
            running_scores=normalize.running.state_dict(),
            stream=stream.state_dict(),
            rng=dist.gather_objects(rng_state()),  # one per rank
            iteration=iteration,
        )

        def write(d: Path) -> None:
            write_trainable(models.actor, models.tokenizer, d / "actor", actor_w)
            if models.shared is not None:  # the value head sits beside the actor it shares
                save_value_head(head, d / "actor")
            else:
                write_trainable(models.critic, models.tokenizer, d / "critic", critic_w)

        if dist.is_main():  # the weights are the same on every rank: write them once
            save_checkpoint(out, iteration, write, st, to_dict(cfg), cfg.run.keep_last)
        dist.barrier()

    guard = NonFiniteGuard(cfg.run.max_bad_steps)
    with StopOnSignal() as stop:
        for it in range(start, cfg.run.iterations):
            exp, metrics = ppo_iteration(
                models, optims, prompts, stream, cfg, normalize, kl_ctl, guard, it
            )
            if monitor is not None:
                texts = decode_texts(
                    models.tokenizer,
                    exp.prompt_ids,
                    exp.prompt_mask,
                    exp.response,
                    exp.response_mask,
                )
                metrics["score/gold"] = float(call_reward_fn(monitor, *texts).mean())
            warn_if_exploding(metrics, cfg, it + 1)
            logger.log(it + 1, metrics, echo=True)
            if cfg.run.sample_every and (it + 1) % cfg.run.sample_every == 0:
                logger.text(it + 1, "samples", _sample_text(models, exp))
            if dist.all_reduce_sum(torch.tensor(float(stop.signum is not None))) > 0:
                checkpoint(it + 1)
                raise StopRequested(stop.signum or signal.SIGTERM)
            if (
                cfg.run.save_every
                and (it + 1) % cfg.run.save_every == 0
                and it + 1 < cfg.run.iterations
            ):
                checkpoint(it + 1)
    checkpoint(cfg.run.iterations)
    logger.close()
    critic_w = dist.full_state_dict(models.shared or models.critic)  # every rank, when sharded
    if dist.is_main():
        write_atomic_dir(
            out / "final-critic",
            lambda d: (
                export_shared_critic(models.shared, models.tokenizer, d, critic_w)
                if models.shared is not None
                else export_model(models.critic, models.tokenizer, d, critic_w)
            ),
        )
    return export_final(models.actor, models.tokenizer, out, cfg)
