"""The supervised training loop shared by SFT and RM (PPO reuses its optimizer/checkpoint parts).

Micro-batches come from a per-epoch permutation seeded by (seed, epoch), so the data position
(epoch, micro-batch) plus the RNG state is all that exact resume needs.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlhfkit.config import TrainConfig
from rlhfkit.models import autocast
from rlhfkit.train import dist
from rlhfkit.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from rlhfkit.train.guard import NonFiniteGuard, StopOnSignal, StopRequested, finite
from rlhfkit.train.logger import MetricLogger
from rlhfkit.train.optim import clip_and_step, optimizer_from_config

LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches consumed in this epoch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def total_steps(n: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum_steps)
    steps = per_epoch * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _mean_stats(acc: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    return (
        {k: float(torch.stack([a[k].detach().float() for a in acc]).mean()) for k in acc[0]}
        if acc
        else {}
    )


def fit(
    model,
    items: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    loss_fn: LossFn,
    cfg: TrainConfig,
    logger: MetricLogger,
    evaluate: Callable[[], dict[str, float]],
    write_model: Callable[[Path, dict | None], None],
    run_config: dict[str, Any],
    resume_state: dict[str, Any] | None = None,
    show_progress: bool = True,
    forward_module: torch.nn.Module | None = None,
    dtype: str = "fp32",
) -> dict[str, float]:
    """Train ``model`` on ``items``; returns the final eval metrics.

    ``loss_fn(module, batch)`` gets ``forward_module`` (default: the model), DDP-wrapped or
    FSDP-sharded when the run is data-parallel. ``write_model(directory, weights)`` writes the
    model; ``weights`` is its consolidated state dict when sharded, else None. ``dtype``:
    ``model.dtype``; bf16-mixed runs ``loss_fn`` and ``evaluate`` under bf16 autocast (the
    backward follows the forward's casts; weights and AdamW state stay fp32). Each optimizer step then consumes ``batch_size`` examples per rank of a
    global micro-batch of ``batch_size * world`` (the last incomplete one is dropped)."""
    n_ranks, my_rank = dist.world(), dist.rank()
    steps = total_steps(
        len(items) if n_ranks == 1 else len(items) // (cfg.batch_size * n_ranks) * cfg.batch_size,
        cfg,
    )
    # DDP-wrapped, or FSDP2-sharded in place (then ``model``'s parameters are the shards: the
    # optimizer is built after this)
    train_module = dist.wrap(forward_module if forward_module is not None else model, cfg.parallel)
    optimizer, scheduler = optimizer_from_config(model, cfg, steps)
    pos = Position()
    if resume_state is not None:
        dist.load_optimizer_state(model, optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        pos = Position(**resume_state["position"])
        set_rng_state(resume_state["rng"][my_rank])
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def checkpoint() -> None:
        weights = dist.full_state_dict(model)  # consolidated when sharded (every rank takes part)
        state = {
            "optimizer": dist.optimizer_state(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "position": vars(pos).copy(),
            "rng": dist.gather_objects(rng_state()),  # one per rank
        }
        if dist.is_main():
            save_checkpoint(
                cfg.output_dir,
                pos.step,
                lambda d: write_model(d, weights),
                state,
                run_config,
                cfg.keep_last,
            )
        dist.barrier()

    model.train()
    show_progress = (
        show_progress and sys.stderr.isatty()
    )  # a log file gets the metric lines instead
    bar = tqdm(total=steps, initial=pos.step, disable=not show_progress, desc="train", leave=False)
    guard = NonFiniteGuard(cfg.max_bad_steps)
    show_progress = show_progress and dist.is_main()
    acc: list[dict[str, torch.Tensor]] = []
    micro_in_step, loss_ok = 0, True
    with StopOnSignal() as stop:
        while pos.step < steps and pos.epoch < cfg.epochs:
            batches = micro_batches(len(items), cfg.batch_size * n_ranks, cfg.seed, pos.epoch)
            if n_ranks > 1:  # every rank takes its slice of each global micro-batch
                batches = [
                    b[my_rank * cfg.batch_size : (my_rank + 1) * cfg.batch_size]
                    for b in batches
                    if len(b) == cfg.batch_size * n_ranks
                ]
            while pos.micro < len(batches) and pos.step < steps:
                batch = to_device(collate([items[i] for i in batches[pos.micro]]), device)
                with autocast(dtype, device):
                    loss, stats = loss_fn(train_module, batch)
                loss_ok &= finite(loss)
                (loss / cfg.grad_accum_steps).backward()
                acc.append({"loss": loss.detach(), **stats})
                pos.micro += 1
                micro_in_step += 1
                if micro_in_step < cfg.grad_accum_steps and pos.micro < len(batches):
                    continue
                # one optimizer step (skipped, and counted, if the loss or the gradient is not finite)
                lr = scheduler.get_last_lr()[0]
                loss_ok = bool(
                    dist.all_reduce_sum(torch.tensor(float(not loss_ok))) == 0
                )  # skip together
                norm = clip_and_step(
                    params,
                    optimizer,
                    scheduler,
                    cfg.max_grad_norm,
                    guard,
                    loss_ok,
                    f"loss/gradient at step {pos.step + 1}",
                )
                pos.step += 1
                micro_in_step, loss_ok = 0, True
                bar.update(1)
                if pos.step % cfg.log_every == 0 or pos.step == steps:
                    metrics = dist.mean_over_ranks(
                        {f"train/{k}": v for k, v in _mean_stats(acc).items()}
                    )
                    metrics.update(
                        {
                            "train/grad_norm": float(norm),
                            "train/lr": lr,
                            "train/skipped_steps": guard.skipped,
                        }
                    )
                    logger.log(pos.step, metrics, echo=not show_progress)
                    acc = []
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < steps:
                    with autocast(dtype, device):
                        evals = evaluate()
                    logger.log(pos.step, {f"eval/{k}": v for k, v in evals.items()})
                    model.train()
                if (
                    dist.all_reduce_sum(torch.tensor(float(stop.signum is not None))) > 0
                ):  # stop together
                    checkpoint()
                    raise StopRequested(stop.signum or signal.SIGTERM)
                if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < steps:
                    checkpoint()
            if pos.micro >= len(batches):
                pos.epoch, pos.micro = pos.epoch + 1, 0
    bar.close()
    with autocast(dtype, device):
        final = evaluate()
    if resume_state is not None and resume_state["position"]["step"] >= steps:
        # a rerun of a finished run: its final evaluation is logged and checkpointed already
        return final
    logger.log(pos.step, {f"eval/{k}": v for k, v in final.items()})
    checkpoint()
    return final
