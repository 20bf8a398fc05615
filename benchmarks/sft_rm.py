"""SFT and reward-model training throughput, rlhfkit against TRL 1.12's SFTTrainer / RewardTrainer.

    .venv/bin/python benchmarks/sft_rm.py --stage sft --compare-trl
    .venv/bin/python benchmarks/sft_rm.py --stage rm --compare-trl

Fixed settings (printed): the tiny or small random-init Llama of ppo_iteration.py, synthetic text
data of fixed length (prompt 32 words, response 48 words, one token per word), batch 8 examples (RM:
8 pairs = 16 sequences), fp32, lr 1e-5, no evaluation, no checkpoints, threads = OMP_NUM_THREADS.
Both runners are timed the same way: a global ``register_optimizer_step_post_hook`` stamps every
optimizer step; tokens/s = tokens of the steps after the warm-up / time from the end of the warm-up
step to the last step. The two alternate A B A B as separate processes; the ratio of medians is
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

HERE = Path(__file__).parent
BATCH, PROMPT, RESPONSE, WARMUP = 8, 32, 48, 3


def _text(row: list[int]) -> str:
    return " ".join(f"w{t}" for t in row)


def write_data(tmp: Path, stage: str, n: int, vocab: int) -> Path:
    prompts = common.prompts(n, PROMPT, vocab - 4, seed=1)
    first = common.prompts(n, RESPONSE, vocab - 4, seed=2)
    second = common.prompts(n, RESPONSE, vocab - 4, seed=3)
    rows = [
        {"prompt": _text(p), "completion": _text(a)}
        if stage == "sft"
        else {"prompt": _text(p), "chosen": " " + _text(a), "rejected": " " + _text(b)}
        for p, a, b in zip(prompts, first, second, strict=True)
    ]
    if stage == "sft":
        for r in rows:
            r["completion"] = " " + r["completion"]
    path = tmp / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def step_clock() -> list[float]:
    """Timestamps of every optimizer step in this process, whoever runs it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *a, **k: stamps.append(time.perf_counter()))
    return stamps


def result(impl: str, stamps: list[float], tokens_per_step: int) -> dict:
    steps = len(stamps) - WARMUP
    seconds = stamps[-1] - stamps[WARMUP - 1]
    return {
        "impl": impl,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tok_per_s": steps * tokens_per_step / seconds,
        "s_per_step": seconds / steps,
        "peak_rss_mb": common.peak_rss_mb(),
    }


def run_ours(stage: str, size: str, steps: int) -> dict:
    import torch

    from rlhfkit.config import RMConfig, SFTConfig, load_config
    from rlhfkit.data.build import load_preferences, load_sft
    from rlhfkit.models import load_tokenizer
    from rlhfkit.stages.rm import run_rm
    from rlhfkit.stages.sft import run_sft

    torch.manual_seed(0)
    dirs = common.build(size)
    tmp = Path(tempfile.mkdtemp())
    data = write_data(tmp, stage, BATCH * (steps + WARMUP), common.SIZES[size][3])
    overrides = [
        f"model.name_or_path={dirs['policy']}",
        f"data.train_file={data}",
        "data.eval_fraction=0",
        f"train.output_dir={tmp / 'out'}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps + WARMUP}",
        "train.lr=1e-5",
        "train.log_every=100000",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    cls, run, load = (SFTConfig, run_sft, load_sft) if stage == "sft" else (RMConfig, run_rm, None)
    cfg = load_config(cls, None, overrides + (["norm_examples=1"] if stage == "rm" else []))
    tok = load_tokenizer(cfg.model)
    if stage == "sft":
        items, _ = load(cfg.data.train_file, tok, cfg.data)
        per_step = BATCH * len(items[0].input_ids)
    else:
        items, _ = load_preferences(cfg.data.train_file, tok, cfg.data)
        per_step = BATCH * sum(len(s) for s in items[0].sequences)
    stamps = step_clock()
    run(cfg)
    return result("rlhfkit", stamps, per_step)


def run_trl(stage: str, size: str, steps: int) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    torch.manual_seed(0)
    dirs = common.build(size)
    tmp = Path(tempfile.mkdtemp())
    data = write_data(tmp, stage, BATCH * (steps + WARMUP), common.SIZES[size][3])
    dataset = load_dataset("json", data_files=str(data), split="train")
    tok = AutoTokenizer.from_pretrained(dirs["policy"])
    common_args = dict(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=BATCH,
        max_steps=steps + WARMUP,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        logging_steps=100000,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        dataloader_num_workers=0,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(dirs["policy"])
        cfg = SFTConfig(**common_args, max_length=PROMPT + RESPONSE + 2, packing=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
        per_step = BATCH * len(trainer.train_dataset[0]["input_ids"])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(dirs["policy"], num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        cfg = RewardConfig(**common_args, max_length=PROMPT + RESPONSE + 2)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
        row = trainer.train_dataset[0]
        per_step = BATCH * (len(row["chosen_ids"]) + len(row["rejected_ids"]))
    stamps = step_clock()
    trainer.train()
    return result("trl", stamps, per_step)


def _child(python: str, impl: str, args) -> dict:
    cmd = [python, str(Path(__file__)), "--impl", impl, "--stage", args.stage]
    cmd += ["--size", args.size, "--steps", str(args.steps)]
    env = common.child_env(impl != "trl", args.malloc)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{impl} runner failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][6:])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--stage", choices=["sft", "rm"], default="sft")
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds with --compare-trl")
    ap.add_argument("--compare-trl", action="store_true")
    ap.add_argument("--malloc", choices=common.MALLOC, default="system", help=common.MALLOC_HELP)
    ap.add_argument("--impl", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:  # child process
        run = run_ours if args.impl == "rlhfkit" else run_trl
        print("BENCH " + json.dumps(run(args.stage, args.size, args.steps)), flush=True)
        return
    import torch
    from ppo_iteration import ensure_trl_venv

    peak = common.matmul_peak_gflops(torch.float32)
    print(
        f"machine: {common.machine()}; {common.threads()} threads; malloc={args.malloc}; "
        f"matmul peak fp32 {peak:.0f} GFLOP/s"
    )
    print(
        f"settings: stage={args.stage} size={args.size} {common.SIZES[args.size]} batch={BATCH} "
        f"prompt={PROMPT} response={RESPONSE} steps={args.steps} (+{WARMUP} warm-up) fp32 "
        f"threads={common.threads()}"
    )
    impls = ["rlhfkit", "trl"] if args.compare_trl else ["rlhfkit"]
    results: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds if args.compare_trl else 1):
        for impl in impls:  # A B A B: machine drift hits both
            if impl == "trl":
                ensure_trl_venv()
            python = str(HERE / ".venv-trl" / "bin" / "python") if impl == "trl" else sys.executable
            results[impl].append(_child(python, impl, args))
    # the machine's speed drifts (a neighbour's load): the peak is the best of before and after
    peak = max(peak, common.matmul_peak_gflops(torch.float32))
    print(f"matmul peak fp32 (best of before and after the runs): {peak:.0f} GFLOP/s")
    for impl, rows in results.items():
        tps = statistics.median(r["tok_per_s"] for r in rows)
        runs = ", ".join(f"{r['tok_per_s']:.0f}" for r in rows)
        print(
            f"{impl:8s} tokens/s={tps:.0f} (runs: {runs})"
            f" s/step={statistics.median(r['s_per_step'] for r in rows):.3f}"
            f" tokens/step={rows[0]['tokens_per_step']}"
            f" peak_rss_mb={max(r['peak_rss_mb'] for r in rows):.0f}"
        )
    if args.compare_trl:
        ours = statistics.median(r["tok_per_s"] for r in results["rlhfkit"])
        theirs = statistics.median(r["tok_per_s"] for r in results["trl"])
        print(f"speed-up (median tokens/s rlhfkit / TRL): {ours / theirs:.2f}x")
    if args.stage == "sft":
        sft_ceiling(args.size, peak, results)


def sft_ceiling(size: str, peak: float, results: dict[str, list[dict]]) -> None:
    """Matmul FLOPs of an SFT step (forward + backward = 3 x 2 per multiply-add: the transformer on
    every token, the LM head on the labelled ones; attention scores ignored), the fraction of the
    peak each runner achieves, and the most any runner doing that work could gain over TRL."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(common.build(size)["policy"])
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    tokens = results["rlhfkit"][0]["tokens_per_step"]
    labelled = BATCH * (RESPONSE + 1)  # the response and EOS
    step = 6 * (common.layer_params(model) * tokens + hidden * vocab * labelled) / 1e9
    floor = step / peak
    for impl, rows in results.items():
        s = statistics.median(r["s_per_step"] for r in rows)
        print(f"{impl:8s} {step:.1f} GFLOP/step -> {step / s / peak:.2f} of the matmul peak")
    if "trl" in results:
        trl = statistics.median(r["s_per_step"] for r in results["trl"])
        print(
            f"ceiling: {floor:.3f} s/step at 100% of peak -> at most {trl / floor:.2f}x TRL "
            f"({trl:.3f} s/step) for this work"
        )


if __name__ == "__main__":
    main()
