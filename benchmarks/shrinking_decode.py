"""The hf engine's rollout with and without shrinking its decode batch as rows end (session 19).

    .venv/bin/python -m rlhfkit.launch .venv/bin/python benchmarks/shrinking_decode.py

SmolLM2-135M-Instruct, the RLVR task's chat prompts, 8 prompts x 4 samples (GRPO's groups, as in
``grpo_step.py --size smollm2``), up to 256 new tokens ending at EOS, temperature 1, fp32. Each
measurement is a fresh process, A B A B: ``shrink`` (the default: rows that ended leave the
batch, ``rollout.sampling._compact``) and ``full`` (``RLHFKIT_SHRINK_DECODE=0``: every row
decodes until the last one ends, as before). Both draw the same samples from the same seed
(tests/test_sampling.py), so the work is identical; the script checks the token counts agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import grpo_step  # noqa: E402

HERE = Path(__file__).parent


def child(rows: int, samples: int, max_new: int, seed: int) -> dict:
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.data.tokenize import encode_prompt, pad_left
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.sampling import generate

    mc = ModelConfig(name_or_path=str(grpo_step.model_dir("smollm2")))
    tok = load_tokenizer(mc)
    model = load_policy(mc, tok, trainable=False)
    prompts = [encode_prompt(tok, p) for p in grpo_step.prompt_rows("smollm2")[:rows]]
    ids, mask = pad_left([p for p in prompts for _ in range(samples)], tok.pad_token_id)
    t0 = time.perf_counter()
    gen = generate(model, ids, mask, max_new_tokens=max_new, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    dt = time.perf_counter() - t0
    return {"s": dt, "tokens": int(gen.lengths.sum()), "stopped": int(gen.stopped.sum()),
            "lengths": gen.lengths.tolist()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("BENCH " + json.dumps(child(a.prompts, a.samples, a.max_new, a.seed)))
        return
    peak, line = common.peaks_line()
    print(line)
    grpo_step.model_dir("smollm2")  # converted once, before the runners
    argv = [sys.executable, __file__, "--child", "--prompts", str(a.prompts), "--samples",
            str(a.samples), "--max-new", str(a.max_new), "--seed", str(a.seed)]  # fmt: skip
    results: dict[str, list[dict]] = {"shrink": [], "full": []}
    for _ in range(a.rounds):
        for name in results:  # A B A B
            env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}",
                   "RLHFKIT_SHRINK_DECODE": "1" if name == "shrink" else "0"}  # fmt: skip
            out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} runner failed:\n{out.stderr[-4000:]}")
            results[name] += [
                json.loads(x[6:]) for x in out.stdout.splitlines() if x[:6] == "BENCH "
            ]
    tokens = {r["tokens"] for rows in results.values() for r in rows}
    if len(tokens) != 1:
        raise SystemExit(f"the runners sampled different token counts: {sorted(tokens)}")
    r0 = results["shrink"][0]
    print(f"work: SmolLM2, {a.prompts} prompts x {a.samples} samples, up to {a.max_new} tokens at "
          f"EOS; {r0['tokens']} tokens, {r0['stopped']} rows ended at EOS, lengths min "
          f"{min(r0['lengths'])} / median {statistics.median(r0['lengths']):.0f}\n")  # fmt: skip
    print("| decode batch | rollout s (each run) | median s | tokens/s |")
    print("|---|---|---|---|")
    med = {}
    for name, rows in results.items():
        med[name] = statistics.median(r["s"] for r in rows)
        each = ", ".join(f"{r['s']:.1f}" for r in rows)
        print(f"| {name} | {each} | {med[name]:.1f} | {r0['tokens'] / med[name]:.1f} |")
    print(f"\nshrinking (median full / median shrink): {med['full'] / med['shrink']:.2f}x")


if __name__ == "__main__":
    main()
