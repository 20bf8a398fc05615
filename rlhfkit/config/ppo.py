"""``rlhfkit ppo`` (and the critic-free estimators): the algorithm's knobs, the held-out
evaluation during a run, and the cross-field checks of a run (estimator, policy loss,
environment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhfkit.config.common import (
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RewardKeys,
    RolloutConfig,
    RunConfig,
    check_parallel,
    check_unused_data,
)
from rlhfkit.config.load import ConfigError, knob, sub


@dataclass(frozen=True)
class PPOAlgoConfig:
    epochs: int = knob(4, "PPO epochs over each experience buffer", lo=1)
    minibatch_size: int = knob(16, "episodes per optimizer step", lo=1)
    micro_batch_size: int = knob(16, "episodes per forward/backward (gradient accumulation)", lo=1)
    clip_eps: float = knob(
        0.2, "policy ratio clip epsilon (the lower one with clip_eps_high)", lo=0, lo_open=True
    )
    clip_eps_high: float | None = knob(
        None, "upper ratio clip epsilon (DAPO clip-higher); empty = clip_eps", lo=0, lo_open=True
    )
    dual_clip: float = knob(
        0.0,
        "dual clip c > 1: a negative advantage's loss is at most -c A (Ye et al. 2020); 0 = off",
        lo=0,
    )
    value_clip_eps: float = knob(
        0.2, "value clip around the rollout values (0 = unclipped MSE)", lo=0
    )
    estimator: str = knob(
        "gae",
        "advantage estimator, a name in algos.ESTIMATORS: the seed's td, mc, gae (with a critic), "
        "or the critic-free grpo, dr_grpo, rloo, reinforce++, reinforce++_baseline "
        "(docs/algorithms.md)",
    )
    gamma: float = knob(1.0, "discount", lo=0, hi=1)
    lam: float = knob(0.95, "GAE lambda", lo=0, hi=1)
    kl_coef: float = knob(0.05, "beta in r_t = -beta * KL_t (initial value when adaptive)", lo=0)
    kl_estimator: Literal["k1", "k2", "k3"] = knob("k1", "per-token KL estimator (Schulman)")
    kl_in: Literal["reward", "loss"] = knob(
        "reward",
        "where the KL penalty goes: into the rewards (r_t = -beta KL_t, the seed) or into the "
        "policy loss (+ beta KL_t, as GRPO does with k3)",
    )
    adaptive_kl: bool = knob(False, "adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(
        6.0, "target per-sequence KL for the adaptive controller", lo=0, lo_open=True
    )
    kl_horizon: float = knob(10000.0, "adaptive controller horizon, in episodes", lo=1)
    ent_coef: float = knob(0.0, "entropy bonus coefficient", lo=0)
    vf_coef: float = knob(0.5, "value loss coefficient", lo=0)
    whiten_advantages: bool = knob(
        True,
        "normalise td/mc/gae advantages to mean 0, std 1 over the buffer (the critic-free "
        "estimators follow their papers: reinforce++ always whitens, the group ones never)",
    )
    reward_norm: Literal["none", "rm_stats", "running"] = knob(
        "rm_stats",
        "normalise scores: RM's stored mean/std (falls back to running), running stats, or none",
    )
    reward_clip: float = knob(0.0, "clip normalised scores to [-c, c] (0 = off)", lo=0)
    aggregation: Literal["auto", "token", "sequence", "token_sum_norm"] = knob(
        "auto",
        "loss average over tokens, over sequences, or token sum / (max_new_tokens x sequences) "
        "(Dr. GRPO's length-unbiased form; with an env, max_total_tokens x sequences); auto = "
        "the policy loss's paper: sequence for gspo (each response weighs 1/G), token otherwise",
    )
    critic_warmup_iterations: int = knob(0, "iterations that update only the critic, first", lo=0)
    policy_loss: Literal["ppo", "gspo", "cispo"] = knob(
        "ppo",
        "ppo = the clipped surrogate (clip_eps, clip_eps_high, dual_clip); gspo = GSPO's "
        "sequence-level ratio clipped with gspo_clip_eps(_high) (Zheng et al. 2025); cispo = "
        "CISPO's clipped stop-gradient IS weight times log pi (MiniMax-M1 2025)",
    )
    gspo_clip_eps: float = knob(
        3e-4,
        "gspo: lower clip epsilon of the sequence ratio (the paper's 3e-4)",
        lo=0,
        lo_open=True,
    )
    gspo_clip_eps_high: float = knob(
        4e-4,
        "gspo: upper clip epsilon of the sequence ratio (the paper's 4e-4)",
        lo=0,
        lo_open=True,
    )
    cispo_clip_eps_high: float = knob(
        4.0,
        "cispo: the IS weight is capped at 1 + this (no lower bound, as MiniMax-M1; 4 caps it at "
        "5, TRL's and ScaleRL's choice)",
        lo=0,
        lo_open=True,
    )
    overlong_buffer: int = knob(
        0,
        "DAPO overlong reward shaping (eq. 13): responses longer than max_new_tokens - this get a "
        "linear penalty reaching -overlong_penalty at max_new_tokens (0 = off)",
        lo=0,
    )
    overlong_penalty: float = knob(1.0, "overlong_buffer: the penalty at max_new_tokens", lo=0)
    rollout_correction: Literal["none", "tis", "mis"] = knob(
        "none",
        "correct for the sampler's logprobs differing from the trainer's (bf16, compiled or "
        "external decoders): tis = per-token weight min(pi_old / pi_sampler, cap) (truncated IS); "
        "mis = per-sequence weight prod_t pi_old / pi_sampler, responses above cap masked out",
    )
    rollout_correction_cap: float = knob(
        2.0, "rollout_correction: the cap C of the weight (> 1)", lo=1, lo_open=True
    )

    def loss_aggregation(self) -> str:
        """``aggregation`` with ``auto`` resolved: GSPO's objective is (1/G) sum_i of a
        response's mean (Zheng et al. 2025, eq. 5), so each response weighs the same whatever
        its length; the clipped surrogate and CISPO average over tokens (DAPO, MiniMax-M1)."""
        if self.aggregation != "auto":
            return self.aggregation
        return "sequence" if self.policy_loss == "gspo" else "token"


@dataclass(frozen=True)
class RLEvalConfig:
    every: int = knob(
        0,
        "evaluate on held-out prompts (data.eval_file, or data.eval_fraction of the prompts) every "
        "N iterations and at the end (0 = never)",
        lo=0,
    )
    max_prompts: int = knob(64, "held-out prompts sampled per evaluation", lo=1)
    judge: str = knob(
        "",
        "an independent judge 'module:function(prompts, responses) -> scores' for eval/judge_score "
        "and eval/win_rate (a monitor passed in Python takes its place)",
    )
    keep_best: Literal["judge", "rm", "last"] = knob(
        "last",
        "also keep output_dir/best/, the policy of the evaluation with the highest held-out judge "
        "or RM score (last = only final/)",
    )


@dataclass(frozen=True)
class PPOConfig(RewardKeys):
    model: ModelConfig = sub(ModelConfig, "the SFT checkpoint: actor, critic trunk and reference")
    critic_init: Literal["sft", "rm"] = knob(
        "sft", "critic trunk from SFT (fresh value head) or from the RM"
    )
    shared_trunk: bool = knob(
        False,
        "critic = a value head on the actor's own transformer (one trunk, one forward, one "
        "optimizer with the critic's lr on the head); off = a separate critic model",
    )
    data: DataConfig = sub(DataConfig, "prompts: {prompt}")
    rollout: RolloutConfig = sub(RolloutConfig)
    ppo: PPOAlgoConfig = sub(PPOAlgoConfig)
    actor: OptimConfig = sub(OptimConfig, "actor optimizer")
    critic: OptimConfig = knob(OptimConfig(lr=1e-5), "critic optimizer")
    run: RunConfig = sub(RunConfig)
    log: LogConfig = sub(LogConfig)
    eval: RLEvalConfig = sub(RLEvalConfig, "held-out evaluation during the run")

    def validate(self, prefix: str = "") -> None:
        check_parallel(self.model, self.run.parallel, f"{prefix}run.parallel")
        check_unused_data(self.data, ("max_length", "train_on_prompt", "packing"), "ppo", prefix)
        held_out = self.data.eval_file or self.data.eval_fraction
        if held_out and not self.eval.every:
            raise ConfigError(
                f"{prefix}data.eval_file / eval_fraction: held-out prompts need {prefix}eval.every > 0"
            )
        if self.eval.every and not held_out:
            raise ConfigError(
                f"{prefix}eval.every: set {prefix}data.eval_file (or data.eval_fraction) to the held-out prompts"
            )
        if self.eval.keep_best != "last" and not self.eval.every:
            raise ConfigError(f"{prefix}eval.keep_best: needs {prefix}eval.every > 0")
        if self.rollout.compile and self.run.parallel == "fsdp":
            raise ConfigError(
                f"{prefix}rollout.compile: not supported with {prefix}run.parallel: fsdp "
                "(the compiled decode step is not tested on sharded modules); use one of them"
            )
        self.check_reward_keys(prefix)
        if self.shared_trunk and self.critic_init != "sft":
            raise ConfigError(
                f"{prefix}critic_init: a shared trunk is the actor's own (SFT) transformer; "
                f"'{self.critic_init}' needs {prefix}shared_trunk: false"
            )
        if self.critic_init == "rm" and not self.reward_model:
            raise ConfigError(f"{prefix}critic_init: 'rm' needs {prefix}reward_model")
        self._validate_estimator(prefix)
        self._validate_env(prefix)
        if self.ppo.minibatch_size % self.ppo.micro_batch_size:
            raise ConfigError(
                f"{prefix}ppo.micro_batch_size must divide {prefix}ppo.minibatch_size"
            )
        if self.rollout.episodes_per_iteration % self.ppo.minibatch_size:
            raise ConfigError(
                f"{prefix}ppo.minibatch_size must divide {prefix}rollout.episodes_per_iteration"
            )
        if self.rollout.engine == "vllm" and self.run.parallel == "fsdp":
            raise ConfigError(
                f"{prefix}rollout.engine: vllm loads the whole policy into vLLM before each "
                f"rollout; {prefix}run.parallel: fsdp shards it (use engine: hf, or ddp)"
            )
        if self.rollout.max_staleness and self.run.parallel == "fsdp":
            raise ConfigError(
                f"{prefix}rollout.max_staleness: {self.rollout.max_staleness} samples with a "
                f"copy of the policy on a thread of its own; {prefix}run.parallel: fsdp shards "
                "the policy over ranks that gather it in step (use max_staleness: 0)"
            )

    def token_budget(self) -> int:
        """The most tokens one response row can hold: ``max_new_tokens``, or with an
        environment the whole episode's ``max_total_tokens`` (its turns and the env's).
        Dr. GRPO's constant (``aggregation: token_sum_norm``) is sequences x this."""
        rc = self.rollout
        return rc.max_total_tokens if self.env.enabled else rc.max_new_tokens

    def _validate_env(self, prefix: str) -> None:
        """Multi-turn keys without an environment, or settings an episode cannot meet."""
        rc = self.rollout
        if not self.env.enabled:
            if rc.max_turns != 1:
                raise ConfigError(
                    f"{prefix}rollout.max_turns: more than one turn needs an environment "
                    f"({prefix}env.factory or {prefix}env.tools)"
                )
            return
        if rc.max_total_tokens < rc.max_new_tokens:
            raise ConfigError(
                f"{prefix}rollout.max_total_tokens ({rc.max_total_tokens}) must be >= "
                f"{prefix}rollout.max_new_tokens ({rc.max_new_tokens}), the first turn's limit"
            )
        if self.ppo.overlong_buffer:
            raise ConfigError(
                f"{prefix}ppo.overlong_buffer: the overlong penalty is for single responses; an "
                f"episode's length is bounded by {prefix}rollout.max_total_tokens"
            )
        # the environment's turn is appended after the model's end-of-turn token (EOS), as the
        # chat template writes a conversation: a turn that ends another way has none
        if rc.stop_strings:
            raise ConfigError(
                f"{prefix}rollout.stop_strings: a turn that ends on a stop string has no "
                "end-of-turn token before the environment's turn, so the context would no "
                "longer match the chat template; with an env a model turn ends at EOS"
            )
        if rc.ignore_eos:
            raise ConfigError(
                f"{prefix}rollout.ignore_eos: with an env every model turn would run to "
                f"{prefix}rollout.max_new_tokens and end the episode as truncated after one "
                "turn; remove the key"
            )

    def _validate_policy_loss(self, prefix: str, est) -> None:
        """Keys the chosen policy loss would ignore are errors; GSPO needs one advantage per
        response (an outcome estimator), its ratio being one per response."""
        pc = self.ppo
        name = f"{prefix}ppo.policy_loss: '{pc.policy_loss}'"
        if pc.policy_loss != "ppo":
            for key, bad in (
                ("clip_eps_high", pc.clip_eps_high is not None),
                ("dual_clip", pc.dual_clip),
            ):
                if bad:
                    raise ConfigError(
                        f"{prefix}ppo.{key}: only used by ppo.policy_loss: ppo ({name[len(prefix) :]} "
                        "has its own epsilons)"
                    )
        if pc.policy_loss == "gspo" and "rewards" in est.inputs:
            raise ConfigError(
                f"{name} clips one ratio per response, so it needs one advantage per response; "
                f"{prefix}ppo.estimator: '{pc.estimator}' gives per-token advantages. Use an "
                "outcome estimator: grpo, dr_grpo or rloo"
            )

    def _validate_estimator(self, prefix: str) -> None:
        """What the estimator cannot provide or use is an error, not a silent no-op."""
        from rlhfkit.algos import ESTIMATORS

        if self.ppo.estimator not in ESTIMATORS:
            raise ConfigError(
                f"{prefix}ppo.estimator: {self.ppo.estimator!r} is not one of {sorted(ESTIMATORS)}"
            )
        est, pc, n = ESTIMATORS[self.ppo.estimator], self.ppo, self.rollout.samples_per_prompt
        name = f"{prefix}ppo.estimator: '{pc.estimator}'"
        if est.needs_groups and n < 2:
            raise ConfigError(
                f"{name} compares the responses to the same prompt; set "
                f"{prefix}rollout.samples_per_prompt >= 2 (it is {n})"
            )
        if not est.needs_values:
            for key, bad in (
                ("shared_trunk", self.shared_trunk),
                ("critic_init", self.critic_init != "sft"),
                ("ppo.critic_warmup_iterations", pc.critic_warmup_iterations > 0),
            ):
                if bad:
                    raise ConfigError(f"{prefix}{key}: {name} uses no critic; remove the key")
        if self.rollout.episodes_per_iteration % n or self.rollout.chunk_size % n:
            raise ConfigError(
                f"{prefix}rollout.samples_per_prompt ({n}) must divide "
                f"{prefix}rollout.episodes_per_iteration and {prefix}rollout.chunk_size"
            )
        if pc.clip_eps_high is not None and pc.clip_eps_high < pc.clip_eps:
            # clip-higher (DAPO) widens the upper bound; a tighter one makes exploration harder
            # and is almost always a swapped pair of keys (docs/decisions.md)
            raise ConfigError(
                f"{prefix}ppo.clip_eps_high: {pc.clip_eps_high} is below {prefix}ppo.clip_eps "
                f"({pc.clip_eps}); the upper epsilon must be >= the lower one"
            )
        self._validate_policy_loss(prefix, est)
        if self.rollout.filter_groups and n < 2:
            raise ConfigError(
                f"{prefix}rollout.filter_groups: drops groups whose scores are all equal; it needs "
                f"{prefix}rollout.samples_per_prompt >= 2 (it is {n})"
            )
        if pc.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(
                f"{prefix}ppo.overlong_buffer: {pc.overlong_buffer} must be below "
                f"{prefix}rollout.max_new_tokens ({self.rollout.max_new_tokens})"
            )
        if pc.dual_clip and pc.dual_clip <= 1:
            raise ConfigError(f"{prefix}ppo.dual_clip: {pc.dual_clip} must be > 1 (or 0 = off)")
