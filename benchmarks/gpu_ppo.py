"""One PPO iteration on a GPU, per phase: fp32 vs bf16-mixed, eager vs CUDA-graph decoding.

A random-init Llama-shaped model of ~0.5B parameters (hidden 1280, 24 layers, 32k vocabulary)
is built locally (no network), with an RM of the same shape. For each setting the script runs
`--iters` PPO iterations of 64 episodes (prompts of 64 tokens, 128 new tokens, EOS ignored) and
prints tokens/s per phase (generation, scoring forwards, update), the peak GPU memory, and the MFU
against the GPU's measured bf16 matmul peak (model FLOPs: 2 N per token per forward, 6 N per token
per trained forward-backward; attention FLOPs left out).

    python benchmarks/gpu_ppo.py --size 0.5b --iters 3           # on a CUDA machine
    python benchmarks/gpu_ppo.py --size tiny --device cpu --iters 1  # a dry run

`bf16-mixed` is `model.dtype: bf16-mixed` (fp32 master weights and AdamW state, bf16 autocast);
`--dtypes fp32 bf16-mixed bf16` adds pure bf16 weights. The settings run in the order that matters
most (eager fp32, eager bf16-mixed, then the CUDA-graph runs), each row printed when it is done; a
setting that raises is reported and the next one runs (the exit status is then 1). `--budget-s`
skips the settings that start after that many seconds, so a caller's time limit never cuts a row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py: the runners' shared settings)

SIZES = {"0.5b": (1280, 24, 20, 3456, 32000), "tiny": (64, 2, 4, 256, 512)}
BATCH, PROMPT, RESPONSE = 64, 64, 128


def build(root: Path, size: str) -> dict[str, Path]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.toy import build_tiny_lm

    hidden, layers, heads, inter, vocab = SIZES[size]
    lm = build_tiny_lm(
        root / "policy",
        [f"w{i}" for i in range(vocab - 4)],
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=inter,
        max_positions=PROMPT + RESPONSE + 8,
    )
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1).save_pretrained(
        root / "rm"
    )
    AutoTokenizer.from_pretrained(lm).save_pretrained(root / "rm")
    return {"policy": lm, "rm": root / "rm", "vocab": vocab}


def bf16_peak_tflops(device: str) -> float:
    """The best 8192^3 bf16 matmul rate over ~1 s after a warm-up (4096 on CPU, shorter)."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best, t_end = 0.0, time.perf_counter() + (1.5 if device == "cuda" else 0.3)
    for _ in range(3):
        a @ b
    while time.perf_counter() < t_end:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(dirs, device: str, dtype: str, compiled: bool, iters: int) -> dict:
    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.data.build import load_prompts
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
    from rlhfkit.stages.ppo import load_models

    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, dirs["vocab"], (BATCH, PROMPT - 1), generator=g).tolist()
    (tmp / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": " ".join(f"w{t - 4}" for t in r)}) + "\n" for r in rows)
    )
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}",
            f"model.device={device}",
            f"model.dtype={dtype}",
            f"reward_model={dirs['rm']}",
            *common.rollout_keys(tmp / "p.jsonl", BATCH, PROMPT, RESPONSE),
            f"rollout.compile={str(compiled).lower()}",
            "ppo.epochs=1",
            "ppo.minibatch_size=64",
            "ppo.micro_batch_size=16",
            "ppo.reward_norm=none",
            f"run.output_dir={tmp / 'run'}",
        ],
    )
    models = load_models(cfg, None, None)
    n_params = sum(p.numel() for p in models.actor.parameters())
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    stream, normalize = PromptStream(len(items), 0), ScoreNormalizer("none", None, 0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = []
    for i in range(iters + 1):  # the first is a warm-up (compilation, allocator)
        _sync(device)
        t0 = time.perf_counter()
        exp, timer = collect(models, items, stream, cfg, normalize)
        advantages(exp, 0.05, cfg.ppo)
        _sync(device)
        t1 = time.perf_counter()
        rl_update(models.learner, exp, cfg, 0.05, update_actor=True)
        _sync(device)
        t2 = time.perf_counter()
        if i:
            out.append(
                (timer.generate, t1 - t0 - timer.generate, t2 - t1, int(exp.response_mask.sum()))
            )
    gen, score, upd, tokens = (sum(x[k] for x in out) / len(out) for k in range(4))
    seq_tokens = BATCH * (PROMPT + RESPONSE)
    flops = (
        2 * n_params * BATCH * RESPONSE  # generation, one token at a time
        + 3 * 2 * n_params * seq_tokens  # scoring: reference, critic, RM (sampler logprobs reused)
        + 2 * 6 * n_params * seq_tokens  # update: actor and critic, forward + backward
    )
    return {
        "dtype": dtype,
        "decode": "cuda-graph"
        if compiled and device == "cuda"
        else ("compiled" if compiled else "eager"),
        "params_M": n_params / 1e6,
        "gen_tok_s": tokens / gen,
        "score_tok_s": seq_tokens * 3 / score,
        "update_tok_s": seq_tokens / upd,
        "iter_s": gen + score + upd,
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else float("nan"),
        "tflops": flops / (gen + score + upd) / 1e12,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(
        "--dtypes",
        nargs="+",
        choices=["fp32", "bf16-mixed", "bf16"],
        default=["fp32", "bf16-mixed"],
    )
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = bf16_peak_tflops(args.device)
    print(f"device: {name}; measured bf16 matmul peak {peak:.1f} TFLOP/s", flush=True)
    dirs = build(Path(tempfile.mkdtemp()), args.size)
    rows, failed = [], 0
    for compiled in (False, True):
        for dtype in args.dtypes:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"skipped {dtype} compiled={compiled}: past --budget-s", flush=True)
                continue
            try:
                r = run(dirs, args.device, dtype, compiled, args.iters)
            except Exception as e:  # report it and measure the other settings
                failed += 1
                print(f"FAILED {dtype} compiled={compiled}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                continue
            r["mfu"] = r["tflops"] / peak
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    head = f"{'dtype':<10} {'decode':<11} {'gen tok/s':>10} {'score tok/s':>12} {'update tok/s':>13} {'iter s':>7} {'peak GB':>8} {'MFU':>6}"
    print(head)
    for r in rows:
        print(
            f"{r['dtype']:<10} {r['decode']:<11} {r['gen_tok_s']:>10.0f} {r['score_tok_s']:>12.0f} "
            f"{r['update_tok_s']:>13.0f} {r['iter_s']:>7.2f} {r['peak_mem_GB']:>8.2f} {r['mfu']:>6.1%}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
