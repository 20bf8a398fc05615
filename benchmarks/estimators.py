"""PPO vs the critic-free estimators vs DPO on the demo's task, from the same SFT checkpoint.

Each RL run changes only `ppo.estimator` and `rollout.samples_per_prompt` in the demo's PPO config
(the same episodes per iteration, iterations, beta, learning rate, RM). `dpo` trains on the
preference data the RM was trained on (its ranked lists as pairs). Then every policy samples the
evaluation prompts and is scored by the independent judge (VADER), the RM, the KL to the SFT
policy, and the share of distinct responses (a collapsed policy repeats itself).

    .venv/bin/python benchmarks/estimators.py --demo-dir runs/demo --seed 0
        [--estimators gae grpo rloo dpo] [--iterations 40] [--dpo-lr 3e-4] [--dpo-beta 0.1]

The SFT and RM come from `rlhfkit demo` (run first if `--demo-dir` has none). Figures print as a
table and go to DEMO_DIR/estimators/summary.json. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--demo-dir", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimators", nargs="+", default=["gae", "grpo", "rloo", "dpo"])
    ap.add_argument("--dpo-lr", type=float, default=3e-4)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=40)
    args = ap.parse_args()

    from rlhfkit.config import (
        DPOConfig,
        ModelConfig,
        PipelineConfig,
        PPOConfig,
        from_dict,
        load_config,
        to_dict,
    )
    from rlhfkit.demo import task
    from rlhfkit.demo.run import run_demo
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rollout.rewards import build_reward
    from rlhfkit.stages.dpo import run_dpo
    from rlhfkit.stages.evaluate import evaluate_policies
    from rlhfkit.stages.pipeline import stage_configs
    from rlhfkit.stages.ppo import run_ppo

    out = Path(args.demo_dir)
    if not (out / "rm" / "final").is_dir():
        run_demo(str(out), seed=args.seed)
    data = out / "data"
    cfg = load_config(
        PipelineConfig,
        str(resources.files("rlhfkit.demo") / "pipeline.yaml"),
        [
            f"output_dir={out}",
            f"base_model={out / 'base' / 'final'}",
            f"ppo.data.train_file={data / 'prompts.jsonl'}",
            f"ppo.data.eval_file={data / 'heldout_prompts.jsonl'}",
            f"ppo.run.seed={args.seed}",
            f"ppo.run.iterations={args.iterations}",
        ],
    )
    _, _, ppo_cfg = stage_configs(cfg)
    gold = task.gold_judge()
    results = {}
    for est in args.estimators:
        if est == "dpo":
            t0 = time.perf_counter()
            final = run_dpo(
                load_config(
                    DPOConfig,
                    None,
                    [
                        f"model.name_or_path={out / 'sft' / 'final'}",
                        f"data.train_file={data / 'rankings.jsonl'}",
                        "data.max_length=64",
                        "data.max_prompt_length=16",
                        "data.eval_fraction=0.15",
                        f"train.output_dir={out / 'estimators' / 'dpo'}",
                        "train.batch_size=32",
                        f"train.lr={args.dpo_lr}",
                        "train.warmup_steps=5",
                        "train.log_every=20",
                        f"train.seed={args.seed}",
                        f"dpo.beta={args.dpo_beta}",
                        "log.tensorboard=false",
                        "log.progress=false",
                    ],
                )
            )
            results[est] = {"seconds": time.perf_counter() - t0, "dir": str(final)}
            continue
        n = 1 if est in ("gae", "td", "mc") else args.samples_per_prompt
        tree = to_dict(ppo_cfg)
        tree["ppo"]["estimator"] = est
        tree["rollout"]["samples_per_prompt"] = n
        tree["run"]["output_dir"] = str(out / "estimators" / est)
        tree["log"]["tensorboard"] = False
        run_cfg = from_dict(PPOConfig, tree)
        t0 = time.perf_counter()
        final = run_ppo(run_cfg, monitor=gold)
        results[est] = {"seconds": time.perf_counter() - t0, "dir": str(final)}

    # evaluation: every policy on the held-out prompts (subjects no training prompt mentions),
    # the same seed and sampling settings; win rate against the SFT policy's own samples
    sft_dir = str(out / "sft" / "final")
    tok = load_tokenizer(ModelConfig(name_or_path=sft_dir))
    reward = build_reward(ppo_cfg, ModelConfig(name_or_path=sft_dir), tok)
    result = evaluate_policies(
        sft_dir,
        {name: r["dir"] for name, r in results.items()},
        reward,
        str(data / "heldout_prompts.jsonl"),
        ppo_cfg.data,
        ppo_cfg.rollout,
        cfg.eval,
        gold,
        seed=1,
        out_dir=out / "estimators" / "eval",
    )
    rows = {}
    for name, m in result.items():
        rows[name] = {k: v for k, v in m.items() if k != "samples"}
        rows[name]["seconds"] = results.get(name, {}).get("seconds", 0.0)
        rows[name]["example"] = [s["response"] for s in m["samples"][:3]]
    (out / "estimators" / "summary.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\n{'policy':<8} {'judge':>14} {'win rate':>14} {'RM':>6} {'KL':>6} {'len':>5} "
        f"{'distinct':>8} {'dist-2':>6} {'time s':>7}"
    )
    for name, r in rows.items():
        win = f"{r['win_rate']:.3f}+-{r['win_rate_se']:.3f}" if "win_rate" in r else "-"
        print(
            f"{name:<8} {r['judge_score']:6.3f}+-{r['judge_score_se']:.3f} {win:>14} "
            f"{r['rm_score']:6.2f} {r['kl_to_ref']:6.2f} {r['length']:5.1f} {r['distinct']:8.2f} "
            f"{r['distinct2']:6.3f} {r['seconds']:7.0f}"
        )
    for name, r in rows.items():
        print(f"{name}: {r['example']}")


if __name__ == "__main__":
    main()
