"""The rollout engines side by side: rlhfkit's own decode loop (``rollout.engine: hf``) against
vLLM (``rollout.engine: vllm``, colocate), A B A B, each measurement in a fresh process.

    .venv-vllm/bin/python benchmarks/rollout_engines.py                  # small and SmolLM2
    .venv-vllm/bin/python benchmarks/rollout_engines.py --sizes small --batches 32 --rounds 1

Runs in the virtualenv that has both engines (bash scripts/setup_vllm.sh builds .venv-vllm).
Per model and batch: the engine's start-up (hf: the model's load; vllm: the LLM's, model load
included), the time to the first token (a rollout of one token), tokens per second of a rollout
of up to --max-new tokens that ends each row at EOS (fp32, temperature 1, the same prompts), and
the process's peak RSS. Then one GRPO step with each engine (``grpo_step.run_ours``: generate,
then the reference (and with vLLM the actor's log pi_old) forward, then the update).

With ``--lora R``: a rank-R LoRA actor (q, k, v, o; trained-looking adapters) on three engines:
``hf`` (the PEFT model itself), ``vllm-adapter`` (``rollout.vllm_lora_sync: adapter``: vLLM's LoRA
kernels, the adapter alone sent per sync) and ``vllm-merged`` (base + deltas sent, vLLM without
LoRA), with each sync's time after an update (``sync s``).

    .venv-vllm/bin/python benchmarks/rollout_engines.py --sizes smollm2 --batches 32 --lora 16 --no-grpo

Prompts: small, 31 random words + BOS (the random-init model rarely samples EOS, so its rows run
to --max-new); SmolLM2, the RLVR task's chat prompts through its template.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import grpo_step  # noqa: E402


def _prompt_ids(size: str, tok, batch: int) -> list[list[int]]:
    rows = grpo_step.prompt_rows(size, batch)
    if size == "smollm2":
        texts = [
            tok.apply_chat_template(r, add_generation_prompt=True, tokenize=False) for r in rows
        ]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tok(r)["input_ids"] for r in rows]


def _lora_actor(model, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )  # fmt: skip
    with torch.no_grad():  # B is zero at init: a trained adapter's
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def measure(engine_name: str, size: str, batch: int, max_new: int, lora: int = 0) -> dict:
    """One process, one engine: start-up, time to first token, a full rollout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.data.tokenize import pad_left
    from rlhfkit.rollout.engines import build_engine

    torch.manual_seed(0)
    lm = grpo_step.model_dir(size)
    tok = AutoTokenizer.from_pretrained(lm)
    kind, _, sync = engine_name.partition("-")  # vllm-adapter: engine vllm, lora sync adapter
    overrides = [f"model.name_or_path={lm}", "reward_fn=m:f", f"rollout.engine={kind}"]
    if lora:
        overrides += ["model.lora.enabled=true", f"model.lora.r={lora}"]
    if sync:
        overrides.append(f"rollout.vllm_lora_sync={sync}")
    cfg = load_config(PPOConfig, None, overrides)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    if lora:
        model = _lora_actor(model, lora)
    engine = build_engine(cfg.rollout, cfg.model, tok)
    engine.sync(model)
    startup = time.perf_counter() - t0
    with torch.no_grad():  # an update, then the sync a rollout starts with
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3 * torch.randn_like(p))
    t0 = time.perf_counter()
    engine.sync(model)
    sync_s = time.perf_counter() - t0
    ids, mask = pad_left(_prompt_ids(size, tok, batch), tok.pad_token_id, torch.device("cpu"))
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    t0 = time.perf_counter()
    engine(model, ids, mask, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = engine(model, ids, mask, max_new_tokens=max_new, **kw)
    wall = time.perf_counter() - t0
    lengths = gen.lengths.tolist()
    return {
        "engine": engine_name,
        "size": size,
        "batch": batch,
        "startup_s": startup,
        "sync_s": sync_s,
        "ttft_s": ttft,
        "rollout_s": wall,
        "tokens": sum(lengths),
        "tok_per_s": sum(lengths) / wall,
        "median_len": statistics.median(lengths),
        "stopped": int(gen.stopped.sum()),
        "peak_rss_mb": common.peak_rss_mb(),
    }


def grpo(engine_name: str, size: str) -> dict:
    row = grpo_step.run_ours(size, 1, 16, engine=engine_name)[0]
    keep = ("total", "generate", "ref", "update")
    return {"engine": engine_name, "size": size, **{k: row[k] for k in keep},
            "peak_rss_mb": common.peak_rss_mb()}  # fmt: skip


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def child(args: list[str]) -> dict:
    env = common.child_env(True, "system") | {"PYTHONPATH": str(HERE)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-4000:]}")
    print(lines[-1], flush=True)  # every row kept in the log, should a later child fail
    return json.loads(lines[-1][6:])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", nargs="+", default=["small", "smollm2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds")
    ap.add_argument("--grpo-rounds", type=int, default=1, help="A B rounds of GRPO steps")
    ap.add_argument("--no-grpo", action="store_true", help="skip the GRPO steps")
    ap.add_argument("--no-gen", action="store_true", help="skip the rollout rows")
    ap.add_argument("--lora", type=int, default=0, help="a LoRA actor of this rank (see above)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "gen":
            row = measure(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            row = grpo(rest[0], rest[1])
        print("BENCH " + json.dumps(row))
        return
    import torch

    peak, line = common.peaks_line()
    print(line)
    rows = []
    engines = ("hf", "vllm-adapter", "vllm-merged") if a.lora else ("hf", "vllm")
    for size in a.sizes if not a.no_gen else []:
        for batch in a.batches:
            for _ in range(a.rounds):
                for engine in engines:  # A B A B
                    rows.append(
                        child(["gen", engine, size, str(batch), str(a.max_new), str(a.lora)])
                    )
                    r = rows[-1]
                    print(f"  {size} b={batch} {engine}: {r['tok_per_s']:.1f} tok/s", flush=True)
    peak = max(peak, common.matmul_peak_gflops(torch.float32))
    print(f"fp32 matmul peak (best of before and after): {peak:.0f} GFLOP/s\n")
    print("| model | batch | engine | tokens/s | rollout s | tokens (median len, stopped) | "
          "first token s | start-up s | sync s | peak RSS MB | n |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in a.sizes if not a.no_gen else []:
        for batch in a.batches:
            for engine in engines:
                rs = [
                    r for r in rows if (r["size"], r["batch"], r["engine"]) == (size, batch, engine)
                ]
                print(
                    f"| {size} | {batch} | {engine} | {_med(rs, 'tok_per_s'):.1f} | {_med(rs, 'rollout_s'):.1f} | "
                    f"{_med(rs, 'tokens'):.0f} ({_med(rs, 'median_len'):.0f}, {_med(rs, 'stopped'):.0f}) | "
                    f"{_med(rs, 'ttft_s'):.2f} | {_med(rs, 'startup_s'):.1f} | {_med(rs, 'sync_s'):.2f} | "
                    f"{max(r['peak_rss_mb'] for r in rs):.0f} | {len(rs)} |"
                )
    if a.no_grpo:
        return
    steps = []
    for size in a.sizes:
        for _ in range(a.grpo_rounds):
            for engine in ("hf", "vllm"):
                steps.append(child(["grpo", engine, size]))
                print(f"  grpo {size} {engine}: {steps[-1]['total']:.1f} s", flush=True)
    print(
        "\n| model | engine | GRPO s/step | generate s | ref (+ old logprobs) s | update s | peak RSS MB | n |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in a.sizes:
        for engine in ("hf", "vllm"):
            rs = [r for r in steps if (r["size"], r["engine"]) == (size, engine)]
            print(
                f"| {size} | {engine} | {_med(rs, 'total'):.1f} | {_med(rs, 'generate'):.1f} | "
                f"{_med(rs, 'ref'):.1f} | {_med(rs, 'update'):.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} | {len(rs)} |"
            )


if __name__ == "__main__":
    main()
