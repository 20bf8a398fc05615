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

    import torch

    from rlhfkit.config import (
        DPOConfig,
        ModelConfig,
        PipelineConfig,
        PPOConfig,
        from_dict,
        load_config,
        to_dict,
    )
    from rlhfkit.data.build import load_prompts
    from rlhfkit.demo import task
    from rlhfkit.demo.run import run_demo
    from rlhfkit.models import PerTokenScalar, load_policy, load_scalar_model, load_tokenizer
    from rlhfkit.stages.dpo import run_dpo
    from rlhfkit.stages.evaluate import sample_and_score
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

    # evaluation: every policy on the same prompts, seed and sampling settings
    sft_dir, rm_dir = str(out / "sft" / "final"), str(out / "rm" / "final")
    mc = ModelConfig(name_or_path=sft_dir)
    tok = load_tokenizer(mc)
    prompts, _ = load_prompts(str(data / "eval_prompts.jsonl"), tok, ppo_cfg.data)
    ids = [p.prompt_ids for p in prompts[: cfg.eval.max_prompts]]
    ref = load_policy(mc, tok, trainable=False)
    rm = PerTokenScalar(load_scalar_model(mc, tok, rm_dir, fresh_head=False, trainable=False))
    rows = {"sft": {"dir": sft_dir}} | results
    for name, row in rows.items():
        policy = ref if name == "sft" else load_policy(mc, tok, path=row["dir"], trainable=False)
        torch.manual_seed(0)
        ev = sample_and_score(policy, ref, rm, tok, ids, ppo_cfg.rollout, gold, seed=1)
        responses = [s["response"] for s in ev.pop("samples")]
        row.update(ev, distinct=len(set(responses)) / len(responses), example=responses[:3])
    (out / "estimators").mkdir(parents=True, exist_ok=True)
    (out / "estimators" / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'policy':<8} {'gold':>6} {'RM':>6} {'KL':>6} {'len':>5} {'distinct':>8} {'time':>6}")
    for name, r in rows.items():
        print(
            f"{name:<8} {r['gold_score']:6.3f} {r['rm_score']:6.2f} {r['kl_to_ref']:6.2f} "
            f"{r['length']:5.1f} {r['distinct']:8.2f} {r.get('seconds', 0):6.0f}"
        )
    for name, r in rows.items():
        print(f"{name}: {r['example']}")


if __name__ == "__main__":
    main()
