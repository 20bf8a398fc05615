"""The RL update with variable-length responses: micro-batches in shuffled order against
micro-batches of similar lengths (``rl.update.by_length``), A B A B (issue 24).

A synthetic GRPO buffer: 64 episodes, prompts of 32 tokens, response lengths drawn uniformly
from [8, 256] (RLVR-like: a few tokens to a few hundred), micro-batches of 16, one epoch, one
optimizer step; the same buffer and seed for both orders.

    python benchmarks/update_buckets.py --size tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()
    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.stages.ppo import load_models

    dirs = common.build(args.size)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "p.jsonl").write_text(json.dumps({"prompt": "w1 w2"}) + "\n")
    b, p, t = 64, 32, args.max_len
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}", "reward_fn=common:length_reward",
            f"data.train_file={tmp / 'p.jsonl'}", f"rollout.episodes_per_iteration={b}",
            f"rollout.chunk_size={b}", "rollout.samples_per_prompt=4", f"rollout.max_new_tokens={t}",
            "ppo.estimator=grpo", "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.kl_coef=0.04",
            "ppo.epochs=1", f"ppo.minibatch_size={b}", "ppo.micro_batch_size=16",
            f"run.output_dir={tmp / 'run'}",
        ],
    )  # fmt: skip
    vocab = common.SIZES[args.size][3]
    exp = common.synthetic_grpo_buffer(b, p, t, vocab, 8)
    lengths = exp.response_mask.sum(1)
    advantages(exp, 0.04, cfg.ppo)
    models = load_models(cfg, None, None)
    times = {"shuffled": [], "length buckets": []}
    for _ in range(args.rounds):  # A B A B
        for name in times:
            torch.manual_seed(1)
            t0 = time.perf_counter()
            rl_update(models.learner, copy.deepcopy(exp), cfg, 0.04, True,
                      length_buckets=name == "length buckets")  # fmt: skip
            times[name].append(time.perf_counter() - t0)
    tokens = int(lengths.sum())
    print(f"machine: {common.machine()}; {common.threads()} threads; size {args.size}; "
          f"{b} episodes, prompt {p}, response lengths 8-{t} (mean {tokens / b:.0f}), micro-batch 16")  # fmt: skip
    print("| micro-batches | update s (each round) | median s | response tokens/s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in ts)} | {med:.2f} | {tokens / med:.0f} |")


if __name__ == "__main__":
    main()
