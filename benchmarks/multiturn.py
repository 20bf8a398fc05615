"""Multi-turn rollout throughput against single-turn on the same model (issue 22).

The same model, batch and number of sampled tokens per episode, A B A B in one process:
- single-turn: B prompts, one response of 3 x T tokens each (``rollout.collect.SingleTurn``);
- multi-turn: B episodes of 3 model turns of T tokens, each answered by an environment whose
  observation is a short user turn (``rollout.episodes``), so every turn re-reads its context.

Model tokens per second is the figure (the environment's tokens are not counted as work done,
but they are read by every later turn's prefill). EOS is off so both sides sample exactly the
same number of tokens.

    python benchmarks/multiturn.py [--size tiny] [--batch 32] [--turn-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import build, prompts
from rlhfkit.config import ModelConfig
from rlhfkit.data.build import PromptItem
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout.collect import SingleTurn
from rlhfkit.rollout.episodes import EnvSettings, MultiTurn


class Answer:
    """Answers each turn with 8 words, ends after 3 model turns."""

    def __init__(self):
        self.n = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, text):
        self.n += 1
        return " ".join(f"w{i}" for i in range(8)), 0.0, self.n >= 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--turn-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    paths = build(args.size)
    mc = ModelConfig(name_or_path=str(paths["policy"]))
    tok = load_tokenizer(mc)
    model = load_policy(mc, tok, trainable=False)
    ids = prompts(args.batch, args.prompt_tokens, len(tok))
    items = [PromptItem(p, " ".join(tok.convert_ids_to_tokens(p))) for p in ids]
    t = args.turn_tokens
    sample = dict(eos_id=None, pad_id=tok.pad_token_id, temperature=1.0, top_k=0, top_p=1.0,
                  stop_sequences=[], compile_decode=False)  # fmt: skip
    single = SingleTurn()
    multi = MultiTurn(EnvSettings(Answer, "answer", 3, t, 3 * t + 64, args.prompt_tokens + 8))
    runs = {"single-turn": [], "multi-turn": []}
    for _ in range(args.repeats):  # A B A B
        for name in runs:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if name == "single-turn":
                ep = single(model, tok, items, {**sample, "max_new_tokens": 3 * t}, None)
                n_tok = int(ep.gen.lengths.sum())
            else:
                ep = multi(model, tok, items, sample, None)
                n_tok = int(ep.action_mask.sum())
            runs[name].append((n_tok, time.perf_counter() - t0))
    print(f"model {args.size}, batch {args.batch}, prompt {args.prompt_tokens} tokens, "
          f"{3 * t} model tokens per episode (3 turns of {t} in multi-turn), fp32, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| rollout | model tokens | seconds (each run) | model tokens/s (best) |")
    print("|---|---|---|---|")
    for name, rs in runs.items():
        best = max(n / s for n, s in rs)
        secs = " / ".join(f"{s:.2f}" for _, s in rs)
        print(f"| {name} | {rs[0][0]} | {secs} | {best:.0f} |")


if __name__ == "__main__":
    main()
