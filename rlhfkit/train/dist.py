"""Data parallelism on torch.distributed: process-group setup, DDP / FSDP2 wrapping, and the
few all-reduces that make statistics global. Every helper is a no-op in a single process, so the
stage recipes read the same with one process or many.

Launch: ``torchrun --nproc_per_node N -m rlhfkit <stage> ...`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that torchrun describes in the environment (no-op without it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        # N processes on the same cores: one thread each, or they slow each other down ~10x
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group(backend)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries of ``x`` over all ranks (two passes, like
    ``algos.masked_mean`` / ``masked_var`` on the concatenated data)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count = all_reduce_sum(m.sum().to(x.dtype))
    mean = all_reduce_sum(torch.where(m, x, zero).sum()) / count.clamp(min=1)
    sq = all_reduce_sum(torch.where(m, (x - mean) ** 2, zero).sum())
    return mean, sq / (count - 1).clamp(min=1)


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average each scalar metric over ranks (all ranks must pass the same keys)."""
    if not dist.is_initialized():
        return metrics
    keys = sorted(metrics)
    t = (
        all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        / world()
    )
    return dict(zip(keys, t.tolist(), strict=True))


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module that training calls: DistributedDataParallel over the process group (gradients
    are averaged across ranks in backward). In a single process, the module itself."""
    if not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
