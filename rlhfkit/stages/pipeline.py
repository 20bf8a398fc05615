"""SFT -> RM -> PPO (and/or SFT -> DPO) -> evaluation from one config; each stage's output feeds
the next. ``methods`` says which of the two paths run; the evaluation compares every policy
trained with the SFT policy on the same held-out prompts.

A stage whose ``final/`` directory exists is finished (it is written atomically, last) and is
not rerun, so an interrupted pipeline resumes stage by stage; within a stage, the stage's own
checkpoints resume it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from rlhfkit.config import ModelConfig, PipelineConfig
from rlhfkit.models import load_tokenizer
from rlhfkit.report import write_report
from rlhfkit.rollout.rewards import RewardFn, build_reward, load_reward_fn
from rlhfkit.stages.dpo import run_dpo
from rlhfkit.stages.evaluate import evaluate_policies
from rlhfkit.stages.ppo import rollout_sampler, run_ppo
from rlhfkit.stages.rm import run_rm
from rlhfkit.stages.sft import run_sft


def _with(cfg, **changes):
    """dataclasses.replace for nested keys: _with(cfg, train__output_dir='x')."""
    nested: dict[str, dict] = {}
    flat = {}
    for k, v in changes.items():
        if "__" in k:
            head, rest = k.split("__", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    for head, sub in nested.items():
        flat[head] = _with(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def stage_configs(cfg: PipelineConfig):
    """The three stage configs with their inputs and outputs wired together (derived, not written back)."""
    out = Path(cfg.output_dir)
    sft_final, rm_final = out / "sft" / "final", out / "rm" / "final"
    sft = _with(
        cfg.sft,
        model__name_or_path=cfg.sft.model.name_or_path or cfg.base_model,
        train__output_dir=str(out / "sft"),
    )
    rm = _with(cfg.rm, model__name_or_path=str(sft_final), train__output_dir=str(out / "rm"))
    ppo = _with(
        cfg.ppo,
        model__name_or_path=str(sft_final),
        run__output_dir=str(out / "ppo"),
        reward_model="" if cfg.ppo.reward_fn else str(rm_final),
    )
    return sft, rm, ppo


def dpo_config(cfg: PipelineConfig):
    """The DPO stage: from the SFT output, on the DPO section's data or else the RM stage's."""
    out = Path(cfg.output_dir)
    data = cfg.dpo.data if cfg.dpo.data.train_file else cfg.rm.data
    return _with(
        cfg.dpo,
        model__name_or_path=str(out / "sft" / "final"),
        train__output_dir=str(out / "dpo"),
        data=data,
    )


def _done(final: Path, name: str) -> bool:
    if final.is_dir():
        print(f"[pipeline] {name}: {final} exists, stage already finished", file=sys.stderr)
        return True
    print(f"[pipeline] {name}: running", file=sys.stderr)
    return False


def run_pipeline(cfg: PipelineConfig, judge: RewardFn | None = None) -> dict:
    out = Path(cfg.output_dir)
    sft, rm, ppo = stage_configs(cfg)
    if not _done(out / "sft" / "final", "sft"):
        run_sft(sft)
    if judge is None and cfg.eval.judge:
        judge = load_reward_fn(cfg.eval.judge, "eval.judge")
    policies = {}
    if "ppo" in cfg.methods:
        if not cfg.ppo.reward_fn and not _done(out / "rm" / "final", "rm"):
            run_rm(rm)
        if not _done(out / "ppo" / "final", "ppo"):
            run_ppo(ppo, monitor=judge)
        policies["ppo"] = str(out / "ppo" / "final")
    if "dpo" in cfg.methods:
        if not _done(out / "dpo" / "final", "dpo"):
            run_dpo(dpo_config(cfg))
        policies["dpo"] = str(out / "dpo" / "final")
    eval_json = out / "eval" / "eval.json"
    if eval_json.exists():
        done = json.loads(eval_json.read_text())
        if set(done) >= {"sft", *policies}:
            print(f"[pipeline] eval: {eval_json} exists, stage already finished", file=sys.stderr)
            return done
        print("[pipeline] eval: a policy was added since; evaluating again", file=sys.stderr)
    print("[pipeline] eval: running", file=sys.stderr)
    tok = load_tokenizer(ModelConfig(name_or_path=str(out / "sft" / "final")))
    reward = None
    if ppo.has_reward() and (ppo.reward_fn or ppo.env.enabled or (out / "rm" / "final").is_dir()):
        reward = build_reward(ppo, ModelConfig(name_or_path=str(out / "sft" / "final")), tok)
    result = evaluate_policies(
        str(out / "sft" / "final"),
        policies,
        reward,
        cfg.eval.prompts_file,
        ppo.data,
        ppo.rollout,
        cfg.eval,
        judge,
        ppo.run.seed + 12345,
        out / "eval",
        sampler=rollout_sampler(ppo, tok.chat_template),  # episodes with the PPO stage's env
    )
    write_report(out, result, cfg)
    return result
