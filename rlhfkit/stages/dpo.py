"""DPO, cDPO and IPO: the policy learns from preference pairs directly, with no reward model and
no sampling (Rafailov et al. 2023). The offline alternative to RM + PPO, on the same data.

    1. preference data, as `rlhfkit rm` reads it; a ranked list of K gives its C(K, 2) pairs
    2. the reference's sequence log-probabilities, once per pair, cached (and checkpointed)
    3. training on the preference loss (``algos.dpo_loss``), with the SFT stage's
       labelled-token forward: completion tokens only, the prompt masked
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algos import dpo_loss
from rlhfkit.config import DPOConfig, LoraConfig
from rlhfkit.data.build import RankItem, load_preferences
from rlhfkit.data.tokenize import pad_right
from rlhfkit.models import (
    LabelledLogprobs,
    autocast,
    device_of,
    load_policy,
    write_trainable,
)
from rlhfkit.models.cpu_gemm import packed_weights
from rlhfkit.stages.common import (
    export_final,
    load_trainable_policy,
    start_stage,
    train_stage,
)
from rlhfkit.train.loop import to_device

IGNORE_INDEX = -100
REF_CACHE = "ref_logprobs.pt"  # beside the model in every checkpoint


@dataclass
class Pair:
    chosen: list[int]  # prompt + chosen response ids
    rejected: list[int]
    chosen_prompt: int  # prompt tokens at the start of each
    rejected_prompt: int
    ref_chosen: float = 0.0  # sum of log ref over the completion tokens (the cache)
    ref_rejected: float = 0.0


def to_pairs(items: list[RankItem]) -> list[Pair]:
    """Every ranked list (best first) as its C(K, 2) (better, worse) pairs, as the RM stage uses."""
    out = []
    for it in items:
        for i, j in itertools.combinations(range(len(it.sequences)), 2):
            s, p = it.sequences, it.prompt_lens
            out.append(Pair(s[i], s[j], p[i], p[j]))
    return out


def _labels(ids: list[int], prompt: int) -> list[int]:
    return [IGNORE_INDEX] * prompt + ids[prompt:]


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows 0..B-1, rejected rows B..2B-1 in one right-padded batch (one forward)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.chosen_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
    ids, mask = pad_right(seqs, pad_id)  # (2B, L)
    labels, _ = pad_right([_labels(s, n) for s, n in zip(seqs, prompts, strict=True)], IGNORE_INDEX)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ref": ref}


def sequence_logprobs(module, batch) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over each row's completion tokens, (2B,) float32.
    ``module``: a ``LabelledLogprobs`` (maybe DDP/FSDP-wrapped); it returns the labelled tokens'
    logprobs flattened in row order, which ``index_add`` sums back per row."""
    lp = module(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N,)
    rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # (N,) the row of each
    return torch.zeros(len(batch["labels"]), device=lp.device).index_add(0, rows, lp)


def pair_loss(module, batch, cfg: DPOConfig):
    logp = sequence_logprobs(module, batch)  # (2B,)
    b = len(logp) // 2
    ref = batch["ref"]
    d = cfg.dpo
    return dpo_loss(
        logp[:b], logp[b:], ref[:b], ref[b:], d.beta, d.loss, d.label_smoothing
    )  # (loss, stats)


@torch.no_grad()
@packed_weights()  # the reference is fixed: each weight reordered once (models.cpu_gemm)
def compute_reference_logprobs(module, pairs: list[Pair], pad_id: int, batch_size: int) -> None:
    """Fill each pair's ``ref_chosen`` / ``ref_rejected`` with the reference's sequence logprobs."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = to_device(collate_pairs(chunk, pad_id), device_of(module))
        logp = sequence_logprobs(module, batch).tolist()
        for j, p in enumerate(chunk):
            p.ref_chosen, p.ref_rejected = logp[j], logp[j + len(chunk)]


def reference_cache(model, tokenizer, cfg, train, evals, ckpt: Path | None) -> str:
    """Load the cached reference logprobs from the checkpoint, or compute them; returns which."""
    pairs = train + evals
    if ckpt is not None and (ckpt / REF_CACHE).exists():
        cache = torch.load(ckpt / REF_CACHE, weights_only=True, map_location="cpu")  # (n, 2)
        if cache.shape[0] == len(pairs):
            for p, (c, r) in zip(pairs, cache.tolist(), strict=True):
                p.ref_chosen, p.ref_rejected = c, r
            return "loaded"
    # the reference forward: with LoRA the model with its adapters off (no second copy); before
    # any update the policy itself (it is the SFT checkpoint then); a resumed run without a cache
    # loads the SFT checkpoint frozen
    module, ctx = LabelledLogprobs(model), contextlib.nullcontext()
    if cfg.model.lora.enabled:
        ctx = model.disable_adapter()
    elif ckpt is not None:
        frozen = dataclasses.replace(cfg.model, lora=LoraConfig(), gradient_checkpointing=False)
        module = LabelledLogprobs(load_policy(frozen, tokenizer, trainable=False))
    was_training = model.training
    model.eval()
    with ctx, autocast(cfg.model.dtype, device_of(model)):  # the precision training uses
        compute_reference_logprobs(module, pairs, tokenizer.pad_token_id, cfg.train.batch_size)
    model.train(was_training)
    return "computed"


@torch.no_grad()
def evaluate_dpo(module, pairs: list[Pair], pad_id: int, batch_size: int, cfg) -> dict[str, float]:
    """Held-out loss, reward accuracy, margin and implicit rewards, averaged over pairs."""
    if not pairs:
        return {}
    module.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = to_device(collate_pairs(chunk, pad_id), device_of(module))
        loss, stats = pair_loss(module, batch, cfg)
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    return {k: v / len(pairs) for k, v in sums.items()}


def _save_cache(d: Path, pairs: list[Pair]) -> None:
    torch.save(torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs]), d / REF_CACHE)


def run_dpo(cfg: DPOConfig) -> Path:
    # 1. tokenizer and preference pairs, and the newest checkpoint when resuming
    out, tokenizer, train_items, eval_items, ckpt, state = start_stage(cfg, load_preferences)
    train, evals = to_pairs(train_items), to_pairs(eval_items)
    # 2. the policy (SFT, or the newest checkpoint) and the reference's logprobs, cached
    model = load_trainable_policy(cfg.model, tokenizer, ckpt)  # LoRA: base + saved adapter
    how = reference_cache(model, tokenizer, cfg, train, evals, ckpt)
    print(f"[dpo] reference log-probs of {len(train) + len(evals)} pairs {how}", file=sys.stderr)
    # 3. train on the preference loss
    pad = tokenizer.pad_token_id
    forward = LabelledLogprobs(model, IGNORE_INDEX)

    def write(d: Path, weights) -> None:
        write_trainable(model, tokenizer, d, weights)
        _save_cache(d, train + evals)

    train_stage(
        cfg,
        out,
        state,
        model,
        train,
        collate=lambda b: collate_pairs(b, pad),
        loss=lambda m, b: pair_loss(m, b, cfg),
        evaluate=lambda: evaluate_dpo(forward, evals, pad, cfg.train.batch_size, cfg),
        write_model=write,
        forward_module=forward,
    )
    return export_final(model, tokenizer, out, cfg)
