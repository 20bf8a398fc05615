"""One GRPO step, timed: generation / reference forward / update, peak RSS, and each phase's
achieved FLOP rate as a fraction of this machine's measured fp32 matmul peak.

    .venv/bin/python benchmarks/grpo_step.py --size tiny --compare-trl
    .venv/bin/python benchmarks/grpo_step.py --size small --compare-trl

The work (the same on both sides, issue 24): 16 prompts of 32 tokens x 4 samples of exactly 48
tokens (no EOS stop), a reference forward, one optimizer step in micro-batches of 16; PPO-clip
(eps 0.2) with a k3 KL in the loss (beta 0.04), a token mean over the batch, a trivial reward
(the completion's length in characters). fp32, threads = OMP_NUM_THREADS.

--compare-trl alternates our runner and TRL 1.16's GRPOTrainer (in its own virtualenv,
benchmarks/.venv-trl116, made on first use) as A B A B subprocesses and prints the ratio of
medians. Settings that could not be made identical are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

HERE = Path(__file__).parent
GROUPS, SAMPLES, PROMPT, RESPONSE = 16, 4, 32, 48
TRL = "trl==1.16.0"

SETTINGS = """| setting | rlhfkit | TRL 1.16 |
|---|---|---|
| sampler | own KV-cache loop, inverse-CDF sampling | HF `generate` (`do_sample`, top_k 0, top_p 1) |
| exactly 48 tokens | `rollout.ignore_eos=true` | `generation_kwargs={"min_new_tokens": 48}` |
| old logprobs | the sampler's own (fp32 fast path; 1 epoch, so = detached current) | detached current (num_iterations=1) |
| reference forward | one batch of 64, logits at the 48 response positions | `_get_per_token_logps_and_entropies`, its own batching |
| entropy | from the sampling logits, for the metric | not computed (no entropy masking) |
| loss | ppo clip 0.2, `kl_in: loss`, k3, beta 0.04, token mean (`aggregation: token`) | `loss_type: dapo` (token mean over the accumulated batch), beta 0.04 (k3) |
| update | 4 micro-batches of 16, one AdamW step | `gradient_accumulation_steps=4`, per-device batch 16 |
| prompt tokens | 31 words + BOS = 32 | the same text, tokenized by TRL (BOS as the tokenizer adds it) |"""


def flops(model_n: int, hidden: int, vocab: int) -> dict[str, float]:
    """Matmul FLOPs of a step by phase (2 per multiply-add; attention scores ignored)."""
    b, seq, head = GROUPS * SAMPLES, PROMPT + RESPONSE, 2 * hidden * vocab
    gen = b * (PROMPT * 2 * model_n + RESPONSE * (2 * model_n + head))
    fwd = b * (seq * 2 * model_n + RESPONSE * head)
    return {"generate": gen, "ref": fwd, "update": 3 * fwd}


def run_ours(size: str, iters: int, micro: int) -> list[dict]:
    import torch

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.data.build import load_prompts
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
    from rlhfkit.stages.ppo import load_models

    torch.manual_seed(0)
    dirs = common.build(size)
    hidden, _, _, vocab = common.SIZES[size]
    tmp = Path(tempfile.mkdtemp())
    words = [" ".join(f"w{t}" for t in p) for p in common.prompts(256, PROMPT - 1, vocab - 4)]
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    n = GROUPS * SAMPLES
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}",
            "reward_fn=common:length_reward",
            f"data.train_file={tmp / 'p.jsonl'}",
            f"data.max_prompt_length={PROMPT}",
            f"rollout.episodes_per_iteration={n}",
            f"rollout.chunk_size={n}",
            f"rollout.samples_per_prompt={SAMPLES}",
            f"rollout.max_new_tokens={RESPONSE}",
            "rollout.ignore_eos=true",
            "ppo.estimator=grpo",
            "ppo.kl_in=loss",
            "ppo.kl_estimator=k3",
            "ppo.kl_coef=0.04",
            "ppo.epochs=1",
            f"ppo.minibatch_size={n}",
            f"ppo.micro_batch_size={micro}",
            "ppo.reward_norm=none",
            f"run.output_dir={tmp / 'run'}",
        ],
    )
    models = load_models(cfg, None, None)
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    stream = PromptStream(len(items), 0)
    normalize = ScoreNormalizer("none", None, 0)
    fl = flops(common.layer_params(models.actor), hidden, vocab)
    rows = []
    for _ in range(iters):
        t0 = time.perf_counter()
        exp, timer = collect(models, items, stream, cfg, normalize)
        advantages(exp, 0.04, cfg.ppo)
        t1 = time.perf_counter()
        rl_update(models.learner, exp, cfg, 0.04, update_actor=True)
        t2 = time.perf_counter()
        rows.append(
            {
                "impl": "rlhfkit",
                "total": t2 - t0,
                "generate": timer.generate,
                "ref": timer.score,  # the reference forward and the reward function
                "reward": 0.0,
                "update": t2 - t1,
                "flops": fl,
            }
        )
    return rows


def summarize(rows: list[dict], peak: float) -> dict:
    keys = ("total", "generate", "ref", "update")
    med = {
        k: statistics.median(r[k] + (r["reward"] if k == "ref" else 0) for r in rows) for k in keys
    }
    fl = rows[0]["flops"]
    return {
        **{f"{k}_s": round(v, 3) for k, v in med.items()},
        "gen_tok_per_s": round(GROUPS * SAMPLES * RESPONSE / med["generate"], 1),
        **{
            f"{k}_peak_frac": round(fl[k] / med[k] / 1e9 / peak, 3)
            for k in ("generate", "ref", "update")
        },
    }


def ensure_venv() -> Path:
    venv = HERE / ".venv-trl116"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0", TRL], check=True)
    subprocess.run(pip + ["-e", str(HERE.parent), "--no-deps"], check=True)  # rlhfkit.toy
    return python


def _subprocess(impl: str, args) -> list[dict]:
    python = str(ensure_venv()) if impl == "trl" else sys.executable
    script = "trl_grpo.py" if impl == "trl" else "grpo_step.py"
    cmd = [python, str(HERE / script), "--size", args.size, "--iters", str(args.iters)]
    cmd += ["--micro", str(args.micro)] + ([] if impl == "trl" else ["--json"])
    env = {**common.child_env(impl != "trl", "system"), "PYTHONPATH": str(HERE)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{impl} runner failed:\n{out.stderr[-4000:]}")
    return [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("BENCH ")]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument(
        "--iters", type=int, default=3, help="timed steps per process (after 1 warm-up)"
    )
    ap.add_argument("--micro", type=int, default=16, help="completions per micro-batch")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds with --compare-trl")
    ap.add_argument("--compare-trl", action="store_true")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:  # child process: warm-up + timed steps, one JSON line each
        for r in run_ours(args.size, args.iters + 1, args.micro)[1:]:
            print("BENCH " + json.dumps({**r, "peak_rss_mb": common.peak_rss_mb()}))
        return
    import torch

    peak = common.matmul_peak_gflops(torch.float32)
    print(
        f"machine: {common.machine()}; {common.threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s"
    )
    print(
        f"work: size={args.size} {common.SIZES[args.size]}, {GROUPS} prompts x {SAMPLES} samples, "
        f"prompt {PROMPT}, response {RESPONSE} (no EOS), micro-batch {args.micro}, fp32"
    )
    impls = ["rlhfkit", "trl"] if args.compare_trl else ["rlhfkit"]
    results: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds if args.compare_trl else 1):
        for impl in impls:  # A B A B: machine drift hits both
            results[impl] += _subprocess(impl, args)
    peak = max(peak, common.matmul_peak_gflops(torch.float32))
    print(f"fp32 matmul peak (best of before and after): {peak:.0f} GFLOP/s\n")
    print(
        "| impl | s/step | generate s | ref (+reward) s | update s | gen tok/s | peak frac gen / ref / update | peak RSS MB | n |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for impl, rows in results.items():
        s = summarize(rows, peak)
        print(
            f"| {impl} | {s['total_s']} | {s['generate_s']} | {s['ref_s']} | {s['update_s']} | "
            f"{s['gen_tok_per_s']} | {s['generate_peak_frac']} / {s['ref_peak_frac']} / "
            f"{s['update_peak_frac']} | {max(r['peak_rss_mb'] for r in rows):.0f} | {len(rows)} |"
        )
    if args.compare_trl:
        ours = statistics.median(r["total"] for r in results["rlhfkit"])
        theirs = statistics.median(r["total"] for r in results["trl"])
        best = sum(results["rlhfkit"][0]["flops"].values()) / 1e9 / peak
        print(f"\nspeed-up (median TRL / median rlhfkit, s/step): {theirs / ours:.2f}x")
        print(
            f"ceiling: {best:.3f} s/step with every phase at the matmul peak -> at most {theirs / best:.2f}x TRL"
        )
        print("\nWhat each side was told (differences that could not be removed):\n" + SETTINGS)


if __name__ == "__main__":
    main()
