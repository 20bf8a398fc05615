"""Small helpers the stage recipes share: threads/seed, output directory, resuming, the
supervised stages' training step, final export."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import ModelConfig, TrainConfig, to_dict
from rlhfkit.data.build import train_eval
from rlhfkit.models import (
    export_model,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    restore_adapter,
)
from rlhfkit.train import dist
from rlhfkit.train.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    save_run_config,
    write_atomic_dir,
)
from rlhfkit.train.logger import MetricLogger
from rlhfkit.train.loop import fit


def setup_run(train: TrainConfig) -> Path:
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    random.seed(train.seed)
    torch.manual_seed(train.seed)
    out = Path(train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(cfg, loader) -> tuple[Any, list, list]:
    """(tokenizer, train, held-out) of a stage that fits on a data set: ``cfg.data`` read by
    ``loader`` with the model's tokenizer, split by ``cfg.train.seed``; every file's skips and
    truncations are printed."""
    tokenizer = load_tokenizer(cfg.model)
    train, evals, reports = train_eval(loader, tokenizer, cfg.data, cfg.train.seed)
    for r in reports:
        print(r.line(), file=sys.stderr)
    return tokenizer, train, evals


def start_stage(cfg, loader) -> tuple[Path, Any, list, list, Path | None, dict | None]:
    """The first steps of a stage that fits on a data set (SFT, RM, DPO): threads, seed and the
    run directory, the tokenizer and data (``load_data``), and the newest checkpoint with its
    trainer state when resuming. Returns (out, tokenizer, train, evals, ckpt, state)."""
    out = setup_run(cfg.train)
    tokenizer, train, evals = load_data(cfg, loader)
    ckpt, state = find_resume(cfg.train)
    return out, tokenizer, train, evals, ckpt, state


def find_resume(train: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    ckpt = latest_checkpoint(train.output_dir) if train.resume else None
    if ckpt is None:
        return None, None
    print(f"resuming from {ckpt}", file=sys.stderr)
    return ckpt, load_trainer_state(ckpt)


def load_trainable_policy(cfg: ModelConfig, tokenizer, ckpt: Path | None, path: str | None = None):
    """The policy to train: from the newest checkpoint when resuming (LoRA: base + saved adapter)."""
    if ckpt is None or cfg.lora.enabled:
        model = load_policy(cfg, tokenizer, path=path)
        if ckpt is not None:
            restore_adapter(model, ckpt)
        return model
    return load_policy(cfg, tokenizer, path=str(ckpt / "model"))


def load_trainable_scalar(
    cfg: ModelConfig, tokenizer, ckpt: Path | None, path: str, fresh_head: bool
):
    if ckpt is None or cfg.lora.enabled:
        model = load_scalar_model(cfg, tokenizer, path, fresh_head=fresh_head)
        if ckpt is not None:
            restore_adapter(model, ckpt)
        return model
    return load_scalar_model(cfg, tokenizer, str(ckpt / "model"), fresh_head=False)


def train_stage(cfg, out: Path, state: dict | None, model, train: list, *, collate, loss,
                evaluate, write_model, forward_module) -> None:  # fmt: skip
    """The training step of SFT, RM and DPO: ``fit`` over ``train`` with the stage's collate,
    loss, held-out evaluation and checkpoint writer, logged to ``out`` (continuing the step
    count of a resumed run). ``cfg``: the stage's config (``train``, ``log``, ``model``)."""
    step = state["position"]["step"] if state else 0
    logger = MetricLogger(out, cfg.log, to_dict(cfg), resume_step=step)
    fit(
        model,
        train,
        collate,
        loss,
        cfg.train,
        logger,
        evaluate=evaluate,
        write_model=write_model,
        run_config=to_dict(cfg),
        resume_state=state,
        show_progress=cfg.log.progress,
        dtype=cfg.model.dtype,
        forward_module=forward_module,
    )
    logger.close()


def export_final(model, tokenizer, out: Path, cfg, extra=None) -> Path:
    """output_dir/final: a plain HF directory with the resolved run config beside the weights."""

    weights = dist.full_state_dict(model)  # consolidated when FSDP-sharded (every rank)

    def write(d: Path) -> None:
        export_model(model, tokenizer, d, weights)
        save_run_config(d, to_dict(cfg))
        if extra is not None:
            extra(d)

    if dist.is_main():
        write_atomic_dir(out / "final", write)
    dist.barrier()
    return out / "final"
