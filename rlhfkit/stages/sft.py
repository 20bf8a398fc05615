"""Stage 1 of the seed: supervised fine-tuning (next-token loss on instruction/response pairs)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhfkit.config import SFTConfig
from rlhfkit.data.build import SFTItem, load_sft
from rlhfkit.data.tokenize import IGNORE_INDEX, packed_batch, pad_right
from rlhfkit.models import LabelledLogprobs, device_of, write_trainable
from rlhfkit.stages.common import (
    export_final,
    load_trainable_policy,
    start_stage,
    train_stage,
)
from rlhfkit.train.loop import to_device


def collate_sft(
    items: list[SFTItem], pad_id: int, pack_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) rows, or with ``pack_to`` padding-free rows of at most that many tokens
    (``data.packing``; ``tokenize.packed_batch``)."""
    if pack_to:
        b = packed_batch(
            [it.input_ids for it in items], pack_to, pad_id, [it.labels for it in items]
        )
        return {
            "input_ids": b["input_ids"],
            "attention_mask": None,
            "labels": b["labels"],
            "position_ids": b["position_ids"],
        }
    ids, mask = pad_right([it.input_ids for it in items], pad_id)  # (B, L)
    labels, _ = pad_right(
        [it.labels for it in items], IGNORE_INDEX
    )  # (B, L), -100 on prompt and pad
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the labelled (completion) tokens of the micro-batch:
    what HF's ``model(**batch).loss`` computes, with the LM head only where a label is."""
    return -module(**batch).mean(), {}  # module: LabelledLogprobs, maybe DDP/FSDP-wrapped


@torch.no_grad()
def evaluate_sft(module, items: list[SFTItem], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted loss and perplexity over ``items``. ``module``: a ``LabelledLogprobs``."""
    if not items:
        return {}
    module.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = to_device(collate_sft(items[i : i + batch_size], pad_id), device_of(module))
        logp = module(**batch)  # (N,)
        total -= float(logp.sum())
        tokens += logp.numel()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run_sft(cfg: SFTConfig) -> Path:
    # 1. tokenizer and data (every skip and truncation is counted and printed), and the newest
    #    checkpoint when resuming
    out, tokenizer, train, evals, ckpt, state = start_stage(cfg, load_sft)
    # 2. the model: the pretrained LM, or the newest checkpoint when resuming
    model = load_trainable_policy(cfg.model, tokenizer, ckpt)
    # 3. train on next-token loss
    pad = tokenizer.pad_token_id
    pack_to = cfg.data.max_length if cfg.data.packing else None  # padding-free rows
    forward = LabelledLogprobs(model, IGNORE_INDEX)
    train_stage(
        cfg,
        out,
        state,
        model,
        train,
        collate=lambda b: collate_sft(b, pad, pack_to),
        loss=sft_loss,
        evaluate=lambda: evaluate_sft(forward, evals, pad, cfg.train.batch_size),
        write_model=lambda d, weights: write_trainable(model, tokenizer, d, weights),
        forward_module=forward,
    )
    # 4. a plain HF checkpoint for the next stages
    return export_final(model, tokenizer, out, cfg)
