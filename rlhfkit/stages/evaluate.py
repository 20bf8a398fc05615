"""Evaluation on held-out prompts: `rlhfkit eval`, the pipeline's last stage, and PPO's periodic
held-out evaluation share these functions.

For each policy, one response per prompt is sampled (the same seed for every policy) and reported
with standard errors:
    rm_score      the reward source's raw score (the proxy that RL optimised)
    judge_score   an independent judge's score (the thing we want)
    kl_to_ref     sum_t log pi(a_t|s_t) - log ref(a_t|s_t) over the sampled response (k1:
                  unbiased for the sequence KL), nats per response
    length, eos_rate
    distinct      distinct responses / responses (1/n when the policy repeats one answer)
    distinct2     distinct bigrams / bigrams over all responses (Li et al. 2016)
    win_rate      against the reference's own samples on the same prompts, under the judge
                  (ties count half)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.algos import masked_sum
from rlhfkit.algos.eval_stats import (
    distinct_n,
    distinct_share,
    mean_and_se,
    pass_at_k_table,
    win_rate,
)
from rlhfkit.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    EvalRunConfig,
    ModelConfig,
    RolloutConfig,
)
from rlhfkit.data.build import PromptItem, load_prompts
from rlhfkit.models import device_of, load_policy, load_tokenizer
from rlhfkit.report.html import EVAL_METRICS, eval_html
from rlhfkit.rollout.collect import SingleTurn
from rlhfkit.rollout.columns import check_columns, columns_of
from rlhfkit.rollout.episodes import multi_turn
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.rollout.rewards import (
    RewardFn,
    build_reward,
    call_reward_fn,
    decode_texts,
    load_reward_fn,
)
from rlhfkit.train.checkpoint import write_atomic_dir


@dataclass
class Samples:
    """One sampled response per prompt, with everything measured on it."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    length: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    rm: list[float] = field(default_factory=list)
    judge: list[float] = field(default_factory=list)


def _reference_forward(policy, ref):
    """A context in which ``ref`` computes the reference logprobs: the reference model, or (None)
    the LoRA policy with its adapters off."""
    if ref is None:
        return policy, policy.disable_adapter()
    return ref, contextlib.nullcontext()


@torch.no_grad()
def sample_policy(
    policy,
    ref,
    tok,
    prompts: list[PromptItem],
    rollout: RolloutConfig,
    seed: int,
    reward=None,
    judge: RewardFn | None = None,
    chunk: int = 32,
    sampler=None,
) -> Samples:
    """Sample ``policy`` on ``prompts`` with a fixed seed and measure each response.
    ``reward``: a rollout reward source (``rollout.rewards``) or None; ``judge``: a reward function;
    both get the prompts' columns. ``sampler``: the rollout's (``SingleTurn`` by default, or
    episodes with an environment: the KL is then over the model's tokens, and the responses
    show the environment's turns marked)."""
    sampler = sampler or SingleTurn()
    was_training = policy.training
    policy.eval()
    g = torch.Generator(device=device_of(policy)).manual_seed(seed)
    sample = dict(
        max_new_tokens=rollout.max_new_tokens,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=rollout.temperature,
        top_k=rollout.top_k,
        top_p=rollout.top_p,
        generator=g,
    )
    out = Samples()
    for i in range(0, len(prompts), chunk):
        items = prompts[i : i + chunk]
        ep = sampler(policy, tok, items, sample, None)
        ids, mask, gen = ep.prompt_ids, ep.prompt_mask, ep.gen
        act = gen.mask if ep.action_mask is None else ep.action_mask
        seq = join(ids, mask, gen.tokens, gen.mask)
        if ref is policy:  # the reference's own samples: KL 0, no forwards to show it
            out.kl += [0.0] * len(items)
        else:
            lp, _ = policy_logprobs(policy, seq, rollout.temperature)
            model, ctx = _reference_forward(policy, ref)
            with ctx:
                lp_ref, _ = policy_logprobs(model, seq, rollout.temperature)
            out.kl += masked_sum(lp - lp_ref, act, dim=1).tolist()
        p_text, r_text = decode_texts(tok, ids, mask, gen.tokens, gen.mask)
        cols = {**columns_of(items), **sampler.columns(ep)}
        out.prompts += p_text
        out.responses += (
            r_text if ep.action_mask is None else marked_trajectories(tok, gen, ep.action_mask)
        )
        out.tokens += [t[m].tolist() for t, m in zip(gen.tokens, gen.mask, strict=True)]
        out.length += act.sum(1).float().tolist()
        out.stopped += gen.stopped.float().tolist()
        if reward is not None:
            out.rm += reward(seq, tok, cols).float().tolist()
        if judge is not None:
            out.judge += call_reward_fn(judge, p_text, r_text, cols).tolist()
    policy.train(was_training)
    return out


def marked_trajectories(tok, gen, action_mask: torch.Tensor) -> list[str]:
    """Each episode's text with the environment's turns marked ``[env: ...]`` (the report's
    sample trajectories): runs of model and environment tokens decoded separately."""
    out = []
    for toks, real, act in zip(gen.tokens, gen.mask, action_mask, strict=True):
        parts, start, n = [], 0, int(real.sum())
        for j in range(1, n + 1):
            if j == n or bool(act[j]) != bool(act[start]):
                text = tok.decode(toks[start:j], skip_special_tokens=True).strip()
                parts.append(text if bool(act[start]) else f"[env: {text}]")
                start = j
        out.append(" ".join(p for p in parts if p))
    return out


def summarize(
    s: Samples, reference: Samples | None = None, n: int = 1, cfg: EvalConfig | None = None
) -> dict[str, float]:
    """Means with standard errors (``<name>_se``), diversity, and the win rate against the
    reference's samples of the same prompts (when both have judge scores). With ``n`` > 1
    samples per prompt and reward scores: pass@k and mean@n (``eval_stats.pass_at_k_table``)."""
    out: dict[str, float] = {}
    for name, values in (
        ("rm_score", s.rm),
        ("judge_score", s.judge),
        ("kl_to_ref", s.kl),
        ("length", s.length),
        ("eos_rate", s.stopped),
    ):
        if values:
            out[name], out[f"{name}_se"] = mean_and_se(values)
    out["distinct"] = distinct_share(s.responses)
    out["distinct2"] = distinct_n(s.tokens, 2)
    if reference is not None and s.judge and reference.judge:
        out["win_rate"], out["win_rate_se"] = win_rate(s.judge, reference.judge)
    if n > 1 and s.rm:
        out.update(pass_at_k_table(s.rm, n, cfg.pass_score if cfg is not None else 1.0))
    return out


def sample_records(s: Samples) -> list[dict[str, Any]]:
    rows = []
    for j, (p, r) in enumerate(zip(s.prompts, s.responses, strict=True)):
        row: dict[str, Any] = {"prompt": p, "response": r, "kl": s.kl[j]}
        if s.rm:
            row["rm"] = s.rm[j]
        if s.judge:
            row["judge"] = s.judge[j]
        rows.append(row)
    return rows


def evaluate_policies(
    reference_dir: str,
    policies: dict[str, str],
    reward,
    prompts_file: str,
    data: DataConfig,
    rollout: RolloutConfig,
    cfg: EvalConfig,
    judge: RewardFn | None,
    seed: int,
    out_dir: Path,
    reference_name: str = "sft",
    sampler=None,
) -> dict[str, Any]:
    """The reference (its own samples: the baseline of the win rates) and every policy of
    ``policies`` (name -> directory) on the same prompts and seed. Writes out_dir/eval.json
    ({name: {metrics..., "samples": [...]}}, the reference first) and out_dir/eval.html."""
    if not prompts_file:
        raise ConfigError("eval.prompts_file: set the held-out prompts to evaluate on")
    mc = ModelConfig(name_or_path=reference_dir)
    tok = load_tokenizer(mc)
    prompts, _ = load_prompts(prompts_file, tok, data)
    prompts = prompts[: cfg.max_prompts]
    if reward is not None:
        check_columns(prompts, reward.needs(), (sampler or SingleTurn()).provides)
    n = cfg.samples_per_prompt  # n consecutive samples of each prompt
    prompts = [p for p in prompts for _ in range(n)]
    ref = load_policy(mc, tok, trainable=False)
    base = sample_policy(ref, ref, tok, prompts, rollout, seed, reward, judge, sampler=sampler)
    result = {reference_name: {**summarize(base, n=n, cfg=cfg), "samples": sample_records(base)}}
    for name, path in policies.items():
        policy = load_policy(mc, tok, path=path, trainable=False)
        s = sample_policy(policy, ref, tok, prompts, rollout, seed, reward, judge, sampler=sampler)
        result[name] = {**summarize(s, base, n, cfg), "samples": sample_records(s)}
    write_atomic_dir(out_dir, lambda d: _write(d, result, cfg.samples_in_report))
    return result


def _write(d: Path, result: dict[str, Any], n_samples: int) -> None:
    (d / "eval.json").write_text(json.dumps(result, indent=2))
    (d / "eval.html").write_text(eval_html(result, n_samples), encoding="utf-8")


def run_eval(cfg: EvalRunConfig, judge: RewardFn | None = None) -> dict[str, Any]:
    """`rlhfkit eval`: a policy against a reference on held-out prompts."""
    if not cfg.policy or not cfg.reference:
        raise ConfigError("policy / reference: both are needed (model directories or hub ids)")
    data, rollout = cfg.sampling()
    tok = load_tokenizer(ModelConfig(name_or_path=cfg.reference))
    reward = (
        build_reward(cfg, ModelConfig(name_or_path=cfg.reference), tok)
        if cfg.has_reward()
        else None
    )
    if judge is None and cfg.eval.judge:
        judge = load_reward_fn(cfg.eval.judge, "eval.judge")
    return evaluate_policies(
        cfg.reference,
        {"policy": cfg.policy},
        reward,
        cfg.eval.prompts_file,
        data,
        rollout,
        cfg.eval,
        judge,
        cfg.seed,
        Path(cfg.output_dir),
        reference_name="reference",
        sampler=eval_sampler(cfg, data, tok.chat_template),
    )


def eval_sampler(cfg: EvalRunConfig, data: DataConfig, chat_template: str | None):
    """`rlhfkit eval`'s sampler: one response per prompt, or episodes with ``env``."""
    if not cfg.env.enabled:
        return SingleTurn()
    return multi_turn(
        cfg.env, cfg.max_turns, cfg.max_new_tokens, cfg.max_total_tokens,
        data.max_prompt_length, chat_template,
    )  # fmt: skip


class HeldOutEval:
    """PPO's periodic evaluation on held-out prompts (``eval.every``): the current actor sampled
    with a fixed seed, logged as ``eval/*``; with ``eval.keep_best`` it tracks the best
    evaluation so far (its state is part of a checkpoint). The reference's own samples, the
    baseline of the win rate, are drawn once."""

    def __init__(
        self,
        prompts: list[PromptItem],
        tokenizer,
        rollout: RolloutConfig,
        judge,
        reward,
        seed: int,
        keep_best: str,
        sampler=None,
    ):
        self.prompts, self.tok, self.rollout = prompts, tokenizer, rollout
        self.sampler = sampler
        self.judge, self.reward, self.seed, self.keep_best = judge, reward, seed, keep_best
        self.reference: Samples | None = None
        self.best: dict[str, float] = {}  # {"value": ..., "iteration": ...}

    def __call__(self, actor, ref) -> dict[str, float]:
        if self.reference is None:
            base, ctx = _reference_forward(actor, ref)
            with ctx:
                self.reference = sample_policy(
                    base,
                    base,
                    self.tok,
                    self.prompts,
                    self.rollout,
                    self.seed,
                    None,
                    self.judge,
                    sampler=self.sampler,
                )
        s = sample_policy(
            actor,
            ref,
            self.tok,
            self.prompts,
            self.rollout,
            self.seed,
            self.reward,
            self.judge,
            sampler=self.sampler,
        )
        # a combined reward source counts its scores per iteration: these are not the rollout's
        getattr(self.reward, "pop_metrics", dict)()
        m = summarize(s, self.reference)
        names = {"kl_to_ref": "eval/kl"}
        return {names.get(k, f"eval/{k}"): m[k] for k in EVAL_METRICS if k in m}

    def improved(self, metrics: dict[str, float], iteration: int) -> bool:
        """Whether this evaluation is the best so far by ``keep_best`` (judge or rm)."""
        if self.keep_best == "last":
            return False
        key = "eval/judge_score" if self.keep_best == "judge" else "eval/rm_score"
        if key not in metrics:
            raise ConfigError(
                f"eval.keep_best: '{self.keep_best}' needs {key}, which this run has not"
            )
        if self.best and metrics[key] <= self.best["value"]:
            return False
        self.best = {"value": metrics[key], "iteration": iteration}
        return True

    def state_dict(self) -> dict[str, float]:
        return dict(self.best)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = dict(state)
