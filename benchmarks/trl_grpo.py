"""TRL 1.16's GRPOTrainer on the same models, prompts and settings as grpo_step.py. Runs inside
benchmarks/.venv-trl116; prints one JSON line per timed step.

Phases are timed by wrapping the trainer's own methods: ``_generate`` (generation, HF
``generate``), ``_get_per_token_logps_and_entropies`` under no_grad (the reference forward) and
``_calculate_rewards``; the rest of a step, from one ``on_step_end`` to the next, is the update.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from grpo_step import flops, model_dir, prompt_rows, work  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    w, lm = work(args.size), model_dir(args.size)
    dataset = Dataset.from_dict({"prompt": prompt_rows(args.size)})
    timing = {"generate": 0.0, "ref": 0.0, "reward": 0.0}
    rows, marks, seen = [], [], {"lengths": [], "prompts": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            total = now - marks[-1]
            marks.append(now)
            rest = total - sum(timing.values())
            rows.append({"impl": "trl", "total": total, **timing, "update": rest, **seen})
            timing.update(generate=0.0, ref=0.0, reward=0.0)
            seen.update(lengths=[], prompts=[])

    n = w["groups"] * w["samples"]
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.micro,  # completions per micro-batch
        gradient_accumulation_steps=n // args.micro,  # one optimizer step per generation
        num_generations=w["samples"],
        max_completion_length=w["max_new"],
        # tiny/small: exactly max_new tokens, no EOS stop; SmolLM2: stop at EOS
        generation_kwargs={} if w["eos"] else {"min_new_tokens": w["max_new"]},
        temperature=1.0,
        beta=0.04,  # k3 KL in the loss
        loss_type="dapo",  # token mean over the whole batch
        num_iterations=1,
        gradient_checkpointing=False,  # TRL 1.16 defaults to True; ours is off: the same work
        max_steps=args.iters + args.warmup,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(lm),
        reward_funcs=common.length_reward,
        args=cfg,
        train_dataset=dataset,
        callbacks=[StepTimer()],
    )

    def timed(fn, bucket, only_no_grad=False):
        return common.timed(fn, timing, bucket, only_no_grad)

    trainer._generate = timed(trainer._generate, "generate")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, "ref", only_no_grad=True
    )
    tok = trainer.processing_class
    reward_fn = timed(trainer._calculate_rewards, "reward")

    def rewards(inputs, prompts, completions, completion_ids_list):
        seen["lengths"] += [len(c) for c in completion_ids_list]
        for p in prompts:
            text = (
                tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                if isinstance(p, list)
                else p
            )
            seen["prompts"].append(
                len(tok(text, add_special_tokens=not isinstance(p, list))["input_ids"])
            )
        return reward_fn(inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = rewards
    trainer.train()
    model = trainer.model
    for r in rows[args.warmup :]:  # the first step is the warm-up
        fl = flops(common.layer_params(model), model.config.hidden_size, model.config.vocab_size,
                   r.pop("prompts"), r["lengths"])  # fmt: skip
        print("BENCH " + json.dumps({**r, "flops": fl, "peak_rss_mb": common.peak_rss_mb()}))


if __name__ == "__main__":
    main()
