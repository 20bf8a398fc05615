"""TRL 1.16's DPOTrainer on the same model, pairs and settings as dpo_step.py. Runs inside
benchmarks/.venv-trl116; prints one JSON line per timed step. The precompute is timed around
the trainer's ``_precompute_ref_logps``; a step from one ``on_step_end`` to the next."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from dpo_step import BATCH, flops_per_step, rows_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    lm = common.build(args.size)["policy"]
    rows = rows_for(args.size)
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    pre, marks = [], []
    real = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            pre.append(time.perf_counter() - t)

    DPOTrainer._precompute_ref_logps = timed

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=BATCH,
        max_length=128,
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=1e-5,
        gradient_checkpointing=False,  # TRL 1.16 defaults to True; ours is off: the same work
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(lm)
    trainer = DPOTrainer(
        model=model,
        args=cfg,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(lm),
        callbacks=[StepTimer()],
    )
    trainer.train()
    fl = flops_per_step(
        common.layer_params(model), model.config.hidden_size, model.config.vocab_size
    )
    for a, b in zip(marks[1:-1], marks[2:], strict=True):  # the first step is the warm-up
        row = {"impl": "trl", "step": b - a, "precompute": sum(pre), "flops": fl}
        print("BENCH " + json.dumps({**row, "peak_rss_mb": common.peak_rss_mb()}))


if __name__ == "__main__":
    main()
