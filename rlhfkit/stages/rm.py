"""Stage 2 of the seed: a reward model (SFT backbone + scalar head) trained on rankings.

Pairs use the Bradley-Terry loss (with the data's margin when present); ranked lists of K use
the InstructGPT K-way loss over all C(K, 2) pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.algos import pairwise_loss, ranking_loss
from rlhfkit.config import RMConfig
from rlhfkit.data.build import RankItem, load_preferences
from rlhfkit.data.tokenize import packed_batch, pad_left, pad_right
from rlhfkit.models import (
    PromptSharingScorer,
    device_of,
    save_reward_stats,
    write_trainable,
)
from rlhfkit.stages.common import (
    export_final,
    load_trainable_scalar,
    start_stage,
    train_stage,
)
from rlhfkit.train.loop import to_device


def shared_prefix(seqs: list[list[int]]) -> int:
    """Tokens at the start of every sequence (the prompt, usually), leaving each at least one."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)


def collate_ranked(
    items: list[RankItem], pad_id: int, pack_to: int | None = None
) -> dict[str, torch.Tensor]:
    """K sequences per item, split into the prefix they share (forwarded once, left-padded) and
    their K remainders (right-padded): the inputs of ``PromptSharingScorer``. With ``pack_to``
    (``data.packing``): the whole sequences in padding-free rows of at most that many tokens."""
    k = max(len(it.sequences) for it in items)
    if pack_to:
        return collate_ranked_packed(items, pad_id, pack_to, k)
    prompts, rests, valid = [], [], torch.zeros(len(items), k, dtype=torch.bool)
    for b, it in enumerate(items):
        p = shared_prefix(it.sequences)
        prompts.append(it.sequences[0][:p])
        for j in range(k):
            # rows beyond a prompt's K repeat its last response and are masked out of the loss
            rests.append(it.sequences[min(j, len(it.sequences) - 1)][p:])
            valid[b, j] = j < len(it.sequences)
    if all(not p for p in prompts):
        prompt_ids = torch.zeros(len(items), 0, dtype=torch.long)
        prompt_mask = torch.zeros(len(items), 0, dtype=torch.long)
    else:
        prompt_ids, prompt_mask = pad_left(prompts, pad_id)  # (B, P)
    response_ids, response_mask = pad_right(rests, pad_id)  # (B*K, R)
    margins = torch.tensor([it.margin if it.margin is not None else 0.0 for it in items])
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "response_ids": response_ids,
        "response_mask": response_mask,
        "valid": valid,
        "margin": margins,
        "has_margin": any(it.margin is not None for it in items),
    }


def collate_ranked_packed(items: list[RankItem], pad_id: int, pack_to: int, k: int):
    seqs, valid = [], torch.zeros(len(items), k, dtype=torch.bool)
    for b, it in enumerate(items):
        for j in range(k):  # rows beyond a prompt's K repeat its last response, masked out
            seqs.append(it.sequences[min(j, len(it.sequences) - 1)])
            valid[b, j] = j < len(it.sequences)
    packed = packed_batch(seqs, pack_to, pad_id)
    empty = torch.zeros(len(items), 0, dtype=torch.long)
    margins = torch.tensor([it.margin if it.margin is not None else 0.0 for it in items])
    return {
        "prompt_ids": empty,
        "prompt_mask": empty,
        "response_ids": packed["input_ids"],
        "response_mask": None,
        "position_ids": packed["position_ids"],
        "ends": packed["ends"],
        "valid": valid,
        "margin": margins,
        "has_margin": any(it.margin is not None for it in items),
    }


def score_batch(scorer, batch) -> torch.Tensor:
    """(B, K) scores. ``scorer``: the RM's ``PromptSharingScorer`` (maybe DDP/FSDP-wrapped)."""
    b, k = batch["valid"].shape
    parts = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
    packed = {p: batch[p] for p in ("position_ids", "ends") if p in batch}
    return scorer(*(batch[p] for p in parts), **packed).view(b, k)


def rm_loss(scorer, batch, use_margin: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """scorer: the RM's ``PromptSharingScorer`` (DDP/FSDP-wrapped when data-parallel)."""
    r = score_batch(scorer, batch)  # (B, K), best first
    if r.shape[1] == 2 and bool(batch["valid"].all()):
        margin = batch["margin"] if (use_margin and batch["has_margin"]) else None
        return pairwise_loss(r[:, 0], r[:, 1], margin)
    return ranking_loss(r, batch["valid"])


@torch.no_grad()
def evaluate_rm(scorer, items: list[RankItem], pad_id: int, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy over all ranked pairs, mean best-minus-worst margin, reward mean/std."""
    if not items:
        return {}
    scorer.eval()
    right, pairs, margins, all_r = 0.0, 0, [], []
    for i in range(0, len(items), batch_size):
        batch = to_device(collate_ranked(items[i : i + batch_size], pad_id), device_of(scorer))
        r = score_batch(scorer, batch)
        for row, valid in zip(r, batch["valid"], strict=True):
            s = row[valid]
            d = s[:, None] - s[None, :]
            upper = torch.triu(torch.ones_like(d, dtype=torch.bool), 1)
            right += float((d[upper] > 0).float().sum() + 0.5 * (d[upper] == 0).float().sum())
            pairs += int(upper.sum())
            margins.append(float(s[0] - s[-1]))
            all_r.append(s)
    allr = torch.cat(all_r)
    return {
        "accuracy": right / pairs,
        "margin": sum(margins) / len(margins),
        "reward_mean": float(allr.mean()),
        "reward_std": float(allr.std()),
    }


@torch.no_grad()
def reward_reference_stats(
    scorer, items: list[RankItem], pad_id: int, batch_size: int
) -> tuple[float, float, int]:
    """Mean/std of the RM's scores over the responses of ``items`` (PPO normalises scores with these)."""
    scorer.eval()
    seqs = [s for it in items for s in it.sequences]
    scores = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i : i + batch_size], pad_id, device_of(scorer))
        empty = ids[:, :0]  # no shared prompt: each sequence whole
        scores.append(scorer(empty, empty, ids, mask))
    allr = torch.cat(scores)
    return float(allr.mean()), float(allr.std()) if allr.numel() > 1 else 1.0, int(allr.numel())


def run_rm(cfg: RMConfig) -> Path:
    # 1. tokenizer and preference data, and the newest checkpoint when resuming
    out, tokenizer, train, evals, ckpt, state = start_stage(cfg, load_preferences)
    # 2. SFT backbone + freshly initialised scalar head (or the newest checkpoint when resuming)
    model = load_trainable_scalar(
        cfg.model, tokenizer, ckpt, cfg.model.name_or_path, fresh_head=True
    )
    # 3. train on the ranking loss
    pad = tokenizer.pad_token_id
    scorer = PromptSharingScorer(model)  # each prompt forwarded once for its K responses
    train_stage(
        cfg,
        out,
        state,
        model,
        train,
        collate=lambda b: collate_ranked(b, pad, cfg.data.max_length if cfg.data.packing else None),
        loss=lambda m, b: rm_loss(m, b, cfg.use_margin),
        evaluate=lambda: evaluate_rm(scorer, evals, pad, cfg.train.batch_size),
        write_model=lambda d, weights: write_trainable(model, tokenizer, d, weights),
        forward_module=scorer,
    )
    # 4. reward statistics on a reference set, stored beside the weights for PPO's normalisation
    mean, std, n = reward_reference_stats(
        scorer, train[: cfg.norm_examples] or train, pad, cfg.train.batch_size
    )
    return export_final(
        model, tokenizer, out, cfg, extra=lambda d: save_reward_stats(d, mean, std, n)
    )
