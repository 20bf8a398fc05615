"""TRL 1.12's PPOTrainer (trl.experimental.ppo) on the same models, data and settings as
ppo_iteration.py. Runs inside benchmarks/.venv-trl; prints one JSON line per timed iteration.

Phases are timed by wrapping TRL's own module functions: `batch_generation` (generation),
`forward` / `get_reward` under no_grad (the scoring forwards); the rest of an iteration, from one
`on_step_end` to the next, is the update (it includes TRL's gc.collect() calls).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

BATCH, PROMPT, RESPONSE = 16, 32, 48


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    import trl.experimental.ppo.ppo_trainer as pt
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    dirs = common.build(args.size)
    _, _, _, vocab = common.SIZES[args.size]
    tok = AutoTokenizer.from_pretrained(dirs["policy"])
    prompts = [[tok.bos_token_id] + p for p in common.prompts(64, PROMPT - 1, vocab - 4)]
    dataset = Dataset.from_dict({"input_ids": prompts})

    timing = {"generate": 0.0, "score": 0.0}

    def timed(fn, bucket, only_no_grad=False):
        return common.timed(fn, timing, bucket, only_no_grad)

    pt.batch_generation = timed(pt.batch_generation, "generate")
    pt.forward = timed(pt.forward, "score", only_no_grad=True)
    pt.get_reward = timed(pt.get_reward, "score", only_no_grad=True)

    rows, marks = [], []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            total = now - marks[-1]
            marks.append(now)
            rows.append(
                {
                    "impl": "trl",
                    "total": total,
                    "generate": timing["generate"],
                    "score": timing["score"],
                    "update": total - timing["generate"] - timing["score"],
                    "gen_tokens": BATCH * RESPONSE,
                }
            )
            timing.update(generate=0.0, score=0.0)

    mb = BATCH // args.minibatches
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(),
        # TRL 1.12: rollout batch = per_device x grad_accum, split into num_mini_batches; a
        # minibatch of mb episodes is then one micro-batch, and accelerate steps the optimizer once
        # per grad_accum micro-batches. Same forward/backward work as ours; fewer optimizer steps.
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=args.minibatches,
        num_mini_batches=args.minibatches,
        num_ppo_epochs=args.epochs,
        total_episodes=BATCH * (args.iters + 1),
        response_length=RESPONSE,
        stop_token=None,
        local_rollout_forward_batch_size=BATCH,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        temperature=1.0,
        kl_coef=0.05,
        logging_steps=1000,
        disable_tqdm=True,
    )
    policy = AutoModelForCausalLM.from_pretrained(dirs["policy"])
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=AutoModelForCausalLM.from_pretrained(dirs["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(
            dirs["reward"], num_labels=1
        ),
        value_model=AutoModelForSequenceClassification.from_pretrained(
            dirs["policy"], num_labels=1
        ),
        train_dataset=dataset,
        callbacks=[StepTimer()],
    )
    trainer.train()
    from ppo_iteration import flops

    fl = flops(
        common.layer_params(policy),
        policy.config.hidden_size,
        policy.config.vocab_size,
        args.epochs,
    )
    for r in rows[1:]:  # the first iteration is the warm-up
        print("BENCH " + json.dumps({**r, "flops": fl, "peak_rss_mb": common.peak_rss_mb()}))


if __name__ == "__main__":
    main()
