"""Multi-turn rollout throughput against single-turn on the same model (issue 22).

The model is the tools demo's RL policy (``rlhfkit demo --task tools``), on the demo's held-out
prompts, A B A B in one process, batch 64, temperature 0.6:
- single-turn: one response per prompt (``rollout.collect.SingleTurn``): the model writes its
  tool call and stops at EOS;
- multi-turn: the same prompts as episodes with the tool environment (``rollout.episodes``):
  the call, the tool's answer appended as a template delta, the final answer. Every turn
  re-reads its context (no KV cache across turns), and the tool runs in the thread pool.

The figure is the model's own sampled tokens per second (the environment's tokens are read but
not counted as work done).

    python -m benchmarks.multiturn --model runs/demo-tools/rl/final --prompts runs/demo-tools/data/heldout.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch

from rlhfkit.config import DataConfig, EnvConfig, ModelConfig
from rlhfkit.data.build import load_prompts
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.collect import SingleTurn
from rlhfkit.rollout.episodes import multi_turn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo-tools/rl/final")
    ap.add_argument("--prompts", default="runs/demo-tools/data/heldout.jsonl")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mc = ModelConfig(name_or_path=args.model)
    tok = load_tokenizer(mc)
    model = load_policy(mc, tok, trainable=False)
    env = EnvConfig(tools=["rlhfkit.demo.tools_task:multiply"])
    multi = multi_turn(env, 2, 32, 64, 64)
    items, _ = load_prompts(args.prompts, tok, DataConfig(max_prompt_length=64))
    items = (items * (args.batch // len(items) + 1))[: args.batch]
    schemas = multi.settings.factory().tools  # the single-turn prompts show the same tools
    single_items = [
        type(p)(encode_prompt(tok, p.prompt, schemas), p.prompt, p.columns, p.where) for p in items
    ]
    sample = dict(max_new_tokens=32, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=0.6, top_k=0, top_p=1.0, stop_sequences=[])  # fmt: skip
    runs = {"single-turn": [], "multi-turn": []}
    for _ in range(args.repeats):  # A B A B
        for name in runs:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if name == "single-turn":
                ep = SingleTurn()(model, tok, single_items, sample, None)
                n_tok = int(ep.gen.lengths.sum())
            else:
                ep = multi(model, tok, items, sample, None)
                n_tok = int(ep.action_mask.sum())
            runs[name].append((n_tok, time.perf_counter() - t0, ep))
    print(f"model {args.model}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    print("| rollout | model tokens | turns | seconds (each run) | model tokens/s (median) |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        rates = sorted(n / s for n, s, _ in rs)
        secs = " / ".join(f"{s:.2f}" for _, s, _ in rs)
        turns = rs[0][2].counts.get("turns", len(rs[0][2].gen.lengths)) / args.batch
        print(f"| {name} | {rs[0][0]} | {turns:.2f} | {secs} | {rates[len(rates) // 2]:.0f} |")


if __name__ == "__main__":
    main()
