"""AdamW and the LR schedule (linear warm-up, then cosine / linear / constant)."""

from __future__ import annotations

import math

import torch

from rlhfkit.config import TrainConfig


def make_optimizer(
    params, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW over ``params``: tensors, or param-group dicts (each may set its own lr/weight_decay)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    # fused AdamW is ~5x faster than the default foreach path on CPU (measured, issue 6)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier on the peak LR at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, schedule)
    )


def optimizer_from_config(model, cfg: TrainConfig, total_steps: int):
    opt = make_optimizer(
        model.parameters(), cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2)
    )
    return opt, make_scheduler(opt, cfg.warmup_steps, total_steps, cfg.schedule)


def clip_and_step(
    params,
    optimizer,
    scheduler,
    max_grad_norm: float,
    guard=None,
    loss_ok: bool = True,
    where: str = "gradient",
) -> torch.Tensor:
    """Clip the global grad norm (0 = no clipping, norm still measured), step, zero grads.

    With a ``NonFiniteGuard``, a non-finite loss or grad norm skips the step (weights, optimizer
    and LR schedule untouched) and counts towards the guard's abort limit.
    """
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else float("inf")
    )
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor; the same value on every rank
        norm = norm.full_tensor()
    if guard is None or guard.check(loss_ok and bool(torch.isfinite(norm)), where):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
