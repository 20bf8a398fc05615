"""DPO, timed: the reference log-prob precompute and the training step, peak RSS, and the step's
achieved FLOP rate as a fraction of this machine's fp32 matmul peak.

    .venv/bin/python benchmarks/dpo_step.py --size tiny --compare-trl

The work (the same on both sides, issue 24): 256 pairs, each a prompt of 32 tokens and two
completions of 48 words (+ EOS), sigmoid loss, beta 0.1, reference log-probs precomputed once,
steps of 16 pairs (one forward/backward of 32 sequences, one AdamW step). fp32, threads =
OMP_NUM_THREADS. --compare-trl alternates our runner and TRL 1.16's DPOTrainer (in
benchmarks/.venv-trl116) A B A B as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from grpo_step import ensure_venv  # noqa: E402

HERE = Path(__file__).parent
PAIRS, BATCH, PROMPT, COMPLETION = 256, 16, 32, 48

SETTINGS = """| setting | rlhfkit | TRL 1.16 |
|---|---|---|
| reference | `rlhfkit dpo`'s cache: one no-grad pass over the pairs, batch 16 | `precompute_ref_log_probs=True`, `precompute_ref_batch_size=16` |
| step | `fit` with `LabelledLogprobs` (the LM head on completion positions only), 32 sequences | `DPOTrainer` concatenated forward of chosen + rejected, 32 sequences |
| loss | sigmoid, beta 0.1 | `loss_type=["sigmoid"]`, beta 0.1 |
| linear layers (fp32, CPU) | oneDNN's matmul, each training product on the faster of oneDNN and torch as timed on the machine (`model.cpu_gemm: auto`, the default), on weights reordered once for the reference precompute (`cpu_gemm.packed_weights`; plain in the step); the `rlhfkit-mkl` row (`--with-mkl`) uses torch's | torch's `F.linear` (MKL sgemm) |
| allocator | glibc (both runners); rlhfkit sets glibc's mmap/trim thresholds when it loads a CPU model (`rlhfkit.launch.tune_glibc_malloc`, off with `RLHFKIT_MALLOC_TUNE=0`; session 8) | glibc, its defaults |
| gradient checkpointing | off | off (set explicitly) |
| lengths | prompt 31 words + BOS, completions 48 words + EOS | the same text, TRL's tokenization (EOS appended) |"""


def rows_for(size: str) -> list[dict]:
    vocab = common.SIZES[size][3]
    words = common.prompts(3 * PAIRS, COMPLETION, vocab - 4, seed=1)
    text = lambda ids, n: " ".join(f"w{t}" for t in ids[:n])  # noqa: E731
    return [
        {
            "prompt": text(words[3 * i], PROMPT - 1),
            "chosen": text(words[3 * i + 1], COMPLETION),
            "rejected": text(words[3 * i + 2], COMPLETION),
        }
        for i in range(PAIRS)
    ]


def flops_per_step(model_n: int, hidden: int, vocab: int) -> float:
    """Matmul FLOPs of one step: forward + backward (3x) of 2 x BATCH sequences, the LM head on
    the completion positions only."""
    seq = PROMPT + COMPLETION + 1
    return 3 * 2 * BATCH * (seq * 2 * model_n + (COMPLETION + 1) * 2 * hidden * vocab)


def run_ours(size: str, steps: int, cpu_gemm: str = "auto") -> list[dict]:
    import torch

    import rlhfkit.stages.dpo as dpo_stage
    import rlhfkit.train.loop as loop
    from rlhfkit.config import DPOConfig, load_config
    from rlhfkit.models import load_policy, load_tokenizer

    torch.manual_seed(0)
    lm = common.build(size)["policy"]
    tmp = Path(tempfile.mkdtemp())
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_for(size)))
    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model.name_or_path={lm}", f"data.train_file={tmp / 'pairs.jsonl'}",
            "data.max_length=128", "data.max_prompt_length=64", "data.eval_fraction=0",
            f"train.output_dir={tmp / 'run'}", f"train.batch_size={BATCH}",
            f"train.max_steps={steps}", "train.lr=1e-5", "dpo.beta=0.1", "dpo.loss=sigmoid",
            "log.tensorboard=false", "log.progress=false", "train.log_every=1000",
            f"model.cpu_gemm={cpu_gemm}",
        ],
    )  # fmt: skip
    marks: dict[str, list[float]] = {"precompute": [], "steps": []}
    real_ref, real_opt = dpo_stage.compute_reference_logprobs, loop.optimizer_from_config

    def timed_ref(*a, **k):
        t = time.perf_counter()
        real_ref(*a, **k)
        marks["precompute"].append(time.perf_counter() - t)

    def hooked_opt(*a, **k):
        opt, sched = real_opt(*a, **k)
        opt.register_step_post_hook(lambda *_: marks["steps"].append(time.perf_counter()))
        marks["steps"].append(time.perf_counter())  # the loop starts
        return opt, sched

    dpo_stage.compute_reference_logprobs, loop.optimizer_from_config = timed_ref, hooked_opt
    dpo_stage.run_dpo(cfg)
    st = marks["steps"]
    model = load_policy(cfg.model, load_tokenizer(cfg.model), trainable=False)
    fl = flops_per_step(
        common.layer_params(model), model.config.hidden_size, model.config.vocab_size
    )
    return [
        {
            "impl": common.IMPL[cpu_gemm],
            "step": b - a,
            "precompute": sum(marks["precompute"]),
            "flops": fl,
        }
        for a, b in zip(st[1:-1], st[2:], strict=True)  # the first step is the warm-up
    ]


def _subprocess(impl: str, args) -> list[dict]:
    ours = impl != "trl"
    python = sys.executable if ours else str(ensure_venv())
    script = "dpo_step.py" if ours else "trl_dpo.py"
    argv = ["--size", args.size, "--steps", str(args.steps)]  # fmt: skip
    return common.runner_rows(impl, script, argv + common.ours_flags(impl), python)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument(
        "--steps", type=int, default=6, help="steps per process (the first is a warm-up)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare-trl", action="store_true")
    ap.add_argument("--with-mkl", action="store_true", help=common.WITH_MKL)
    ap.add_argument("--with-onednn", action="store_true", help=common.WITH_ONEDNN)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-gemm", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:
        for r in run_ours(args.size, args.steps, args.cpu_gemm):
            print("BENCH " + json.dumps({**r, "peak_rss_mb": common.peak_rss_mb()}))
        return
    import torch

    peak, line = common.peaks_line()
    print(line)
    print(f"work: size={args.size} {common.SIZES[args.size]}, {PAIRS} pairs, {BATCH} per step, "
          f"prompt {PROMPT} + completions {COMPLETION}, sigmoid, beta 0.1, fp32")  # fmt: skip
    impls = common.impls(args.compare_trl, args.with_mkl, args.with_onednn)
    results: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds if len(impls) > 1 else 1):
        for impl in impls:  # A B A B
            results[impl] += _subprocess(impl, args)
    peak = max(peak, common.matmul_peak_gflops(torch.float32))
    print(f"fp32 matmul peak (best of before and after): {peak:.0f} GFLOP/s\n")
    print(
        "| impl | s/step (median) | precompute s (256 pairs) | step at fraction of peak | peak RSS MB | n |"
    )
    print("|---|---|---|---|---|---|")
    med = {}
    for impl, rows in results.items():
        med[impl] = statistics.median(r["step"] for r in rows)
        pre = statistics.median(r["precompute"] for r in rows)
        frac = rows[0]["flops"] / med[impl] / 1e9 / peak
        rss = max(r["peak_rss_mb"] for r in rows)
        print(f"| {impl} | {med[impl]:.3f} | {pre:.1f} | {frac:.2f} | {rss:.0f} | {len(rows)} |")
    if args.with_mkl:
        print(f"\noneDNN linears (median rlhfkit-mkl / median rlhfkit): "
              f"{med['rlhfkit-mkl'] / med['rlhfkit']:.2f}x")  # fmt: skip
    if args.with_onednn:
        print(f"\nauto's kernels (median rlhfkit-onednn / median rlhfkit): "
              f"{med['rlhfkit-onednn'] / med['rlhfkit']:.2f}x")  # fmt: skip
    if args.compare_trl:
        print(
            f"\nspeed-up (median TRL / median rlhfkit, s/step): {med['trl'] / med['rlhfkit']:.2f}x"
        )
        print("\nWhat each side was told:\n" + SETTINGS)


if __name__ == "__main__":
    main()
