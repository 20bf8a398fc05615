"""Stage 3 of the seed: RL from the SFT policy against a reward. PPO with four models (actor,
critic, reference, reward model), or a critic-free estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++)
with three: the same rollout, update and checkpoints, chosen by ``ppo.estimator``.

Each iteration reads like the seed:
    1. rollout     the actor samples n responses per prompt; we record log pi, log pi_ref,
                   V(s_t) (with a critic) and R_final
    2. rewards     r_t = -beta KL_t, plus R_final at the last token
    3. advantages  td / mc / gae with the critic, or the group / REINFORCE++ estimators without
    4. update      clipped surrogate (+ value loss) (+ entropy bonus), N epochs of minibatches
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch

from rlhfkit.algos import AdaptiveKLController, FixedKLController, get_estimator
from rlhfkit.config import ConfigError, LoraConfig, PPOConfig, to_dict
from rlhfkit.data.build import PromptItem, load_prompts, train_eval
from rlhfkit.data.tokenize import check_tools_shown
from rlhfkit.models import (
    autocast,
    device_of,
    export_model,
    load_policy,
    load_tokenizer,
    read_reward_stats,
)
from rlhfkit.rl.critics import NoCritic, SeparateCritic, SharedTrunk
from rlhfkit.rl.metrics import check_names, rollout_metrics
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import (
    PromptStream,
    RolloutModels,
    ScoreNormalizer,
    SingleTurn,
)
from rlhfkit.rollout.columns import check_columns
from rlhfkit.rollout.engines import build_engine
from rlhfkit.rollout.episodes import multi_turn
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.rewards import (
    RewardFn,
    build_reward,
    call_reward_fn,
    decode_texts,
    load_reward_fn,
    rm_shares_tokenizer,
)
from rlhfkit.rollout.staleness import rollouts_for
from rlhfkit.stages.common import (
    export_final,
    find_resume,
    load_trainable_policy,
    load_trainable_scalar,
    setup_run,
)
from rlhfkit.stages.evaluate import HeldOutEval
from rlhfkit.train import dist
from rlhfkit.train.checkpoint import rng_state, save_checkpoint, set_rng_state, write_atomic_dir
from rlhfkit.train.guard import NonFiniteGuard, StopOnSignal, StopRequested, finite
from rlhfkit.train.logger import MetricLogger

Models = RolloutModels


# --------------------------------------------------------------------------- models


def load_learner(cfg: PPOConfig, actor, tok, ckpt: Path | None):
    """The actor with its critic mode: none (critic-free estimators), a shared trunk, or a
    separate critic model from the SFT (fresh head) or the RM."""
    if not get_estimator(cfg.ppo.estimator).needs_values:
        return NoCritic(actor, cfg)
    if cfg.shared_trunk:
        return SharedTrunk(actor, cfg, ckpt)
    critic = load_trainable_scalar(
        cfg.model,
        tok,
        ckpt / "critic" if ckpt else None,
        cfg.reward_model if cfg.critic_init == "rm" else cfg.model.name_or_path,
        fresh_head=cfg.critic_init == "sft",
    )
    critic.train()  # dropout is off already; train() only matters for gradient checkpointing
    return SeparateCritic(actor, critic, cfg)


def load_models(cfg: PPOConfig, ckpt: Path | None, reward_fn: RewardFn | None) -> Models:
    tok = load_tokenizer(cfg.model)
    actor = load_trainable_policy(cfg.model, tok, ckpt / "actor" if ckpt else None)
    actor.train()
    frozen_cfg = dataclasses.replace(cfg.model, lora=LoraConfig(), gradient_checkpointing=False)
    # with LoRA, pi_ref is the actor with its adapters disabled: no second copy of the weights
    ref = None if cfg.model.lora.enabled else load_policy(frozen_cfg, tok, trainable=False)
    if cfg.critic_init == "rm" and not rm_shares_tokenizer(cfg.reward_model, tok):
        raise ConfigError(
            f"critic_init: 'rm' needs the RM to share the actor's tokenizer; {cfg.reward_model} "
            "has another (vocabulary or special tokens), so its trunk cannot read the actor's "
            "tokens: use critic_init: sft"
        )
    learner = load_learner(cfg, actor, tok, ckpt)
    reward = build_reward(cfg, frozen_cfg, tok, reward_fn)
    if cfg.env.tools or cfg.env.mcp:  # the schemas must reach the model through its template
        check_tools_shown(tok, "env.tools")
    sampler = rollout_sampler(cfg, tok.chat_template, build_engine(cfg.rollout, cfg.model, tok))
    if cfg.run.parallel == "fsdp":  # every rank runs the frozen forwards in step: shard them too
        for frozen in (ref, reward.module):
            if frozen is not None:
                dist.shard(frozen)
    return Models(tok, learner, ref, reward, sampler)


def rollout_sampler(cfg: PPOConfig, chat_template: str | None, engine=None):
    """One response per prompt, or episodes with the config's environment (``chat_template``:
    the policy tokenizer's, for ``env.tool_parser: auto``), sampled by ``engine``
    (``rollout.engine``; rlhfkit's own decode loop when None)."""
    if not cfg.env.enabled:
        return SingleTurn(engine)
    rc = cfg.rollout
    return multi_turn(
        cfg.env, rc.max_turns, rc.max_new_tokens, rc.max_total_tokens,
        cfg.data.max_prompt_length, chat_template, engine,
    )  # fmt: skip


# --------------------------------------------------------------------------- one iteration


def ppo_iteration(
    models: Models, rollouts, cfg: PPOConfig, kl_ctl, guard: NonFiniteGuard, it: int
) -> tuple[Experience, dict[str, float]]:
    t_start = time.perf_counter()
    # 1. rollout: n responses per prompt, with log pi, log pi_ref, V(s_t) and R_final per episode
    # (sampled now, or by a rollout worker ahead of the update: rollout.max_staleness)
    exp, timings, staleness = rollouts.next(it)
    per_source = getattr(models.reward, "pop_metrics", dict)()  # score/<name>, several sources
    # 2-3. rewards r_t = -beta KL_t (+ R_final at the end), advantages (and returns)
    beta = kl_ctl.value
    metrics = advantages(exp, beta, cfg.ppo)
    # 4. update: actor (after the critic warm-up) and critic; skipped if a reward is not finite
    t_up = time.perf_counter()
    checked = [t for t in (exp.rewards, exp.values) if t is not None]
    if guard.check(finite(*checked), f"reward/value at iteration {it + 1}"):
        update_actor = it >= cfg.ppo.critic_warmup_iterations
        metrics.update(rl_update(models.learner, exp, cfg, beta, update_actor, guard))
        kl_ctl.update(metrics["kl/seq_mean"], len(exp) * dist.world())  # global mean KL, episodes
    t_end = time.perf_counter()
    metrics.update(
        rollout_metrics(exp, timings, beta, guard.skipped, t_end - t_up, t_end - t_start)
    )
    metrics.update(models.learner.lrs())
    metrics.update(dist.mean_over_ranks(per_source))
    if cfg.rollout.max_staleness:
        metrics["rollout/staleness"] = float(staleness)
    rollouts.published(it + 1)  # the policy after this update: the worker samples with it next
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


def _texts(models: Models, exp: Experience) -> tuple[list[str], list[str]]:
    return decode_texts(
        models.tokenizer, exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask
    )


def _sample_text(models: Models, exp: Experience, n: int = 3) -> str:
    prompts, responses = _texts(models, exp)
    return "\n\n".join(
        f"PROMPT: {p}\nRESPONSE: {r}\nSCORE: {float(s):.3f}"
        for p, r, s in zip(prompts[:n], responses[:n], exp.raw_scores, strict=False)
    )


# --------------------------------------------------------------------------- checkpoints


class RunState:
    """Everything a checkpoint holds besides the weights: the optimizers, the KL controller, the
    running score statistics, the prompt stream's position, the best held-out evaluation and
    every rank's RNG."""

    def __init__(self, models: Models, kl_ctl, normalize, stream: PromptStream, held_out=None):
        self.models, self.kl_ctl, self.normalize, self.stream = models, kl_ctl, normalize, stream
        self.held_out = held_out

    def restore(self, state: dict | None) -> int:
        """Load a checkpoint's state; returns the iteration to start from."""
        if state is None:
            return 0
        self.models.learner.optims.load(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.normalize.running.load_state_dict(state["running_scores"])
        self.stream.load_state_dict(state["stream"])
        if self.held_out is not None:
            self.held_out.load_state_dict(state.get("best_eval", {}))
        set_rng_state(state["rng"][dist.rank()])
        return state["iteration"]

    def save(self, out: Path, cfg: PPOConfig, iteration: int) -> None:
        # collectives first (every rank): consolidated weights and optimizer states under FSDP
        learner = self.models.learner
        st = learner.optims.state()
        weights = learner.weights()
        st.update(
            kl_ctl=self.kl_ctl.state_dict(),
            running_scores=self.normalize.running.state_dict(),
            stream=self.stream.state_dict(),
            best_eval=self.held_out.state_dict() if self.held_out is not None else {},
            rng=dist.gather_objects(rng_state()),  # one per rank
            iteration=iteration,
        )
        if dist.is_main():  # the weights are the same on every rank: write them once

            def write(d: Path) -> None:
                learner.write(d, weights, self.models.tokenizer)

            save_checkpoint(out, iteration, write, st, to_dict(cfg), cfg.run.keep_last)
        dist.barrier()


# --------------------------------------------------------------------------- the recipe


def _check_config(cfg: PPOConfig, reward_fn: RewardFn | None) -> None:
    if not (cfg.has_reward() or reward_fn):
        raise ConfigError(
            "reward_model / reward_fn / reward_url / rewards / env: set one of them (an RM "
            "directory, a Python reward, a reward server, a list of sources, or an environment)"
        )
    n, rc = dist.world(), cfg.rollout
    if rc.episodes_per_iteration % (n * rc.samples_per_prompt) or cfg.ppo.minibatch_size % n:
        raise ConfigError(
            f"rollout.episodes_per_iteration must divide by the {n} ranks x "
            f"rollout.samples_per_prompt, and ppo.minibatch_size by the ranks"
        )


def held_out_eval(cfg: PPOConfig, models: Models, prompts: list[PromptItem], monitor):
    """The periodic held-out evaluation (``eval.every``), or None. Its judge is the monitor passed
    in Python, else ``eval.judge``."""
    if not cfg.eval.every:
        return None
    judge = monitor or (load_reward_fn(cfg.eval.judge, "eval.judge") if cfg.eval.judge else None)
    if cfg.eval.keep_best == "judge" and judge is None:
        raise ConfigError("eval.keep_best: 'judge' needs eval.judge (module:function)")
    return HeldOutEval(
        prompts[: cfg.eval.max_prompts],
        models.tokenizer,
        cfg.rollout,
        judge,
        models.reward,
        cfg.run.seed + 4242,
        cfg.eval.keep_best,
        models.sampler,  # episodes too, with an environment
    )


def export_best(models: Models, out: Path, cfg: PPOConfig, best: dict) -> None:
    """output_dir/best: the actor of the best held-out evaluation so far, a plain HF directory."""
    weights = dist.full_state_dict(models.actor)  # every rank, when sharded

    def write(d: Path) -> None:
        export_model(models.actor, models.tokenizer, d, weights)
        (d / "best.json").write_text(json.dumps({"by": cfg.eval.keep_best, **best}))

    if dist.is_main():
        write_atomic_dir(out / "best", write)
    dist.barrier()


def kl_controller(cfg: PPOConfig):
    pc = cfg.ppo
    if pc.adaptive_kl:
        return AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
    return FixedKLController(pc.kl_coef)


def run_ppo(
    cfg: PPOConfig, reward_fn: RewardFn | None = None, monitor: RewardFn | None = None
) -> Path:
    """Train; returns output_dir/final (the actor). ``monitor(prompts, responses)`` is an optional
    independent judge (e.g. the demo's gold scorer) whose mean is logged as ``score/gold`` per iteration."""
    _check_config(cfg, reward_fn)
    out = setup_run(cfg.run)
    ckpt, state = find_resume(cfg.run)
    models = load_models(cfg, ckpt, reward_fn)
    torch.manual_seed(cfg.run.seed + 1000 * dist.rank())  # ranks sample different responses
    prompts, held_out_prompts, reports = train_eval(
        load_prompts, models.tokenizer, cfg.data, cfg.run.seed
    )  # held-out: data.eval_file, or an eval_fraction split never trained on
    for report in reports:
        print(report.line(), file=sys.stderr)
    for rows in (prompts, held_out_prompts):  # a column a reward needs, on every row
        check_columns(rows, models.reward.needs(), models.sampler.provides)
    stream = PromptStream(len(prompts), cfg.run.seed)
    held_out = held_out_eval(cfg, models, held_out_prompts, monitor)
    kl_ctl = kl_controller(cfg)
    rm_stats = read_reward_stats(cfg.reward_model) if cfg.reward_model else None
    normalize = ScoreNormalizer(cfg.ppo.reward_norm, rm_stats, cfg.ppo.reward_clip)
    run_state = RunState(models, kl_ctl, normalize, stream, held_out)
    start = run_state.restore(state)
    logger = MetricLogger(out, cfg.log, to_dict(cfg), resume_step=start)
    guard = NonFiniteGuard(cfg.run.max_bad_steps)
    rollouts = rollouts_for(models, prompts, stream, cfg, normalize)
    with StopOnSignal() as stop, contextlib.closing(rollouts):
        for it in range(start, cfg.run.iterations):
            exp, metrics = ppo_iteration(models, rollouts, cfg, kl_ctl, guard, it)
            if monitor is not None:
                metrics["score/gold"] = float(call_reward_fn(monitor, *_texts(models, exp)).mean())
            if held_out is not None and (
                (it + 1) % cfg.eval.every == 0 or it + 1 == cfg.run.iterations
            ):
                with (
                    dist.full_weights(models.learner.generator),  # FSDP: as in rollouts
                    autocast(cfg.model.dtype, device_of(models.actor)),
                ):
                    metrics.update(held_out(models.actor, models.ref))
                if held_out.improved(metrics, it + 1):
                    export_best(models, out, cfg, held_out.best)
            warn_if_exploding(metrics, cfg, it + 1)
            sources = tuple(getattr(models.reward, "names", tuple)())
            logger.log(it + 1, check_names(metrics, sources), echo=True)
            if cfg.run.sample_every and (it + 1) % cfg.run.sample_every == 0:
                logger.text(it + 1, "samples", _sample_text(models, exp))
            if dist.all_reduce_sum(torch.tensor(float(stop.signum is not None))) > 0:
                run_state.save(out, cfg, it + 1)
                raise StopRequested(stop.signum or signal.SIGTERM)
            last = it + 1 == cfg.run.iterations
            if cfg.run.save_every and (it + 1) % cfg.run.save_every == 0 and not last:
                run_state.save(out, cfg, it + 1)
    run_state.save(out, cfg, cfg.run.iterations)
    logger.close()
    models.learner.export_critic(out, models.tokenizer)  # nothing without a critic
    return export_final(models.actor, models.tokenizer, out, cfg)
