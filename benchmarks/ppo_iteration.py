"""One PPO iteration, timed: generation / scoring forwards / update, throughput, peak RSS, and the
achieved FLOP rate of each phase as a fraction of this machine's measured matmul peak.

    .venv/bin/python benchmarks/ppo_iteration.py --size tiny --epochs 1 --minibatches 1
    .venv/bin/python benchmarks/ppo_iteration.py --size small --epochs 4 --minibatches 4 --compare-trl

Fixed settings (recorded in the output): batch 16, prompt 32 tokens, response 48 tokens, sampling
without an EOS stop (every response is 48 tokens), fp32, threads = OMP_NUM_THREADS (2 here).
--compare-trl alternates our runner and TRL 1.12's PPOTrainer (in its own virtualenv,
benchmarks/.venv-trl, made on first use) as A B A B subprocesses and prints the ratio of medians.
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
BATCH, PROMPT, RESPONSE = 16, 32, 48


def flops(
    model_n: int, hidden: int, vocab: int, epochs: int, shared: bool = False
) -> dict[str, float]:
    """Matmul FLOPs of the work an iteration needs, by phase (2 per multiply-add; attention
    scores ignored). The actor's old logprobs come from the sampling logits in both
    implementations, so scoring is the reference, the critic (or shared trunk) and the RM."""
    seq, head = PROMPT + RESPONSE, 2 * hidden * vocab
    gen = BATCH * (PROMPT * 2 * model_n + RESPONSE * (2 * model_n + head))
    actor_fwd = BATCH * (seq * 2 * model_n + RESPONSE * head)
    body_fwd = BATCH * seq * 2 * model_n
    score = actor_fwd + 2 * body_fwd  # reference, critic, reward model
    # forward + backward (2x) of actor and critic; one trunk when shared
    update = epochs * 3 * (actor_fwd + (0 if shared else body_fwd))
    return {"generate": gen, "score": score, "update": update}


def run_ours(
    size: str,
    iters: int,
    epochs: int,
    minibatches: int,
    shared: bool = False,
    one_step: bool = False,
    compile_decode: bool = False,
) -> list[dict]:
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
    words = [
        " ".join(f"w{t}" for t in p) for p in common.prompts(64, PROMPT - 1, vocab - 4)
    ]  # + BOS = 32
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    mb = BATCH // minibatches
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}",
            f"reward_model={dirs['reward']}",
            *common.rollout_keys(tmp / "p.jsonl", BATCH, PROMPT, RESPONSE),
            f"ppo.epochs={epochs}",
            f"ppo.minibatch_size={BATCH if one_step else mb}",
            f"ppo.micro_batch_size={mb}",
            "ppo.reward_norm=none",
            f"run.output_dir={tmp / 'run'}",
            f"shared_trunk={str(shared).lower()}",
            f"rollout.compile={str(compile_decode).lower()}",
        ],
    )
    models = load_models(cfg, None, None)
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    stream = PromptStream(len(items), 0)
    normalize = ScoreNormalizer("none", None, 0)
    fl = flops(common.layer_params(models.actor), hidden, vocab, epochs, shared)
    rows = []
    for _ in range(iters):
        t0 = time.perf_counter()
        exp, timer = collect(models, items, stream, cfg, normalize)
        advantages(exp, 0.05, cfg.ppo)
        t1 = time.perf_counter()
        rl_update(models.learner, exp, cfg, 0.05, update_actor=True)
        t2 = time.perf_counter()
        n_tok = int(exp.response_mask.sum())
        rows.append(
            {
                "impl": "rlhfkit-shared" if shared else "rlhfkit",
                "total": t2 - t0,
                "generate": timer.generate,
                "score": timer.score,
                "update": t2 - t1,
                "gen_tokens": n_tok,
                "flops": fl,
            }
        )
    return rows


def summarize(rows: list[dict], peak: float, epochs: int) -> dict:
    med = {
        k: statistics.median(r[k] for r in rows) for k in ("total", "generate", "score", "update")
    }
    fl = rows[0]["flops"]
    trained = BATCH * (PROMPT + RESPONSE) * epochs
    return {
        **{f"{k}_s": round(v, 3) for k, v in med.items()},
        "gen_tok_per_s": round(rows[0]["gen_tokens"] / med["generate"], 1),
        "train_tok_per_s": round(trained / med["update"], 1),
        **{
            f"{k}_peak_frac": round(fl[k] / med[k] / 1e9 / peak, 3)
            for k in ("generate", "score", "update")
        },
    }


def _subprocess(python: str, impl: str, args) -> list[dict]:
    cmd = [
        python,
        str(HERE / ("trl_ppo.py" if impl == "trl" else "ppo_iteration.py")),
        "--size",
        args.size,
        "--iters",
        str(args.iters),
        "--epochs",
        str(args.epochs),
        "--minibatches",
        str(args.minibatches),
        "--json",
    ] + (["--shared-trunk"] if impl == "rlhfkit-shared" else [])
    cmd += ["--one-step-per-epoch"] if args.one_step_per_epoch and impl != "trl" else []
    cmd += ["--compile"] if args.compile and impl != "trl" else []
    env = common.child_env(impl != "trl", args.malloc)
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
        "--iters", type=int, default=4, help="timed iterations per process (after 1 warm-up)"
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds with --compare-trl")
    ap.add_argument("--compare-trl", action="store_true")
    ap.add_argument(
        "--one-step-per-epoch",
        action="store_true",
        help="rlhfkit takes one optimizer step per epoch over the whole batch, in --minibatches "
        "micro-batches: what TRL 1.12 does (its num_mini_batches splits the batch, but "
        "accelerate accumulates them into one step per epoch in a single process)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="rlhfkit decodes with rollout.compile=true (torch.compile + static cache; the "
        "compile happens in the uncounted warm-up iteration)",
    )
    ap.add_argument(
        "--shared-trunk",
        action="store_true",
        help="also run rlhfkit with shared_trunk=true (one transformer for actor and critic; "
        "not TRL's setting, so reported beside the comparison, not in the ratio)",
    )
    ap.add_argument("--malloc", choices=common.MALLOC, default="system", help=common.MALLOC_HELP)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:  # child process: warm-up + timed iterations, one JSON line each
        rows = run_ours(
            args.size,
            args.iters + 1,
            args.epochs,
            args.minibatches,
            args.shared_trunk,
            args.one_step_per_epoch,
            args.compile,
        )[1:]
        for r in rows:
            print("BENCH " + json.dumps({**r, "peak_rss_mb": common.peak_rss_mb()}))
        return
    import torch

    peak32 = common.matmul_peak_gflops(torch.float32)
    peak16 = common.matmul_peak_gflops(torch.bfloat16)
    print(
        f"machine: {common.machine()}; {common.threads()} threads; malloc={args.malloc}; matmul peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s"
    )
    print(
        f"settings: size={args.size} {common.SIZES[args.size]} batch={BATCH} prompt={PROMPT} response={RESPONSE} "
        f"epochs={args.epochs} minibatches={args.minibatches} fp32, no EOS stop"
        + (", rlhfkit: one optimizer step per epoch" if args.one_step_per_epoch else "")
        + (", rlhfkit: compiled decode" if args.compile else "")
    )
    impls = ["rlhfkit", "trl"] if args.compare_trl else ["rlhfkit"]
    if args.shared_trunk:
        impls.append("rlhfkit-shared")
    results: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds if args.compare_trl else 1):
        for impl in impls:  # A B A B: machine drift hits both
            python = str(HERE / ".venv-trl" / "bin" / "python") if impl == "trl" else sys.executable
            if impl == "trl":
                ensure_trl_venv()
            results[impl] += _subprocess(python, impl, args)
    # the machine's speed drifts (a neighbour's load): the peak is the best of before and after
    peak32 = max(peak32, common.matmul_peak_gflops(torch.float32))
    print(f"matmul peak fp32 (best of before and after the runs): {peak32:.0f} GFLOP/s")
    for impl, rows in results.items():
        s = summarize(rows, peak32, args.epochs)
        print(
            f"{impl:8s} "
            + " ".join(f"{k}={v}" for k, v in s.items())
            + f" peak_rss_mb={max(r['peak_rss_mb'] for r in rows):.0f} (n={len(rows)})"
        )
    if args.compare_trl:
        ours = statistics.median(r["total"] for r in results["rlhfkit"])
        theirs = statistics.median(r["total"] for r in results["trl"])
        print(f"speed-up (median TRL / median rlhfkit, time per iteration): {theirs / ours:.2f}x")
        best = sum(results["rlhfkit"][0]["flops"].values()) / 1e9 / peak32
        print(
            f"ceiling: {best:.3f} s per iteration with every phase at 100% of the matmul peak -> "
            f"at most {theirs / best:.2f}x TRL for this work"
        )
        gen_floor(args.size, peak32, statistics.median(r["generate"] for r in results["trl"]))


def gen_floor(size: str, peak: float, trl_generate: float) -> None:
    """The least time generation can take: the prompt forward at the matmul peak plus
    RESPONSE - 1 decode steps at their measured matmul floor, and the speed-up over TRL's
    generation (HF ``generate``) that this allows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(common.build(size)["policy"])
    step = common.decode_step_floor(model, BATCH)
    prompt = BATCH * PROMPT * 2 * common.layer_params(model) / 1e9 / peak
    floor = prompt + (RESPONSE - 1) * step
    print(
        f"generation floor: decode step matmul {step * 1e3:.1f} ms at batch {BATCH} (all weights "
        f"read per step), prompt forward {prompt:.3f} s at peak -> {floor:.3f} s per rollout; "
        f"at most {trl_generate / floor:.2f}x TRL's generation ({trl_generate:.3f} s)"
    )


def ensure_trl_venv() -> None:
    venv = HERE / ".venv-trl"
    if (venv / "bin" / "python").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0", "trl==1.12.0"], check=True)
    subprocess.run(
        pip + ["-e", str(HERE.parent), "--no-deps"], check=True
    )  # for rlhfkit.toy in common.py


if __name__ == "__main__":
    main()
