"""Data parallelism on torch.distributed: process-group setup, DDP / FSDP2 wrapping, and the
few all-reduces that make statistics global. Every helper is a no-op in a single process, so the
stage recipes read the same with one process or many.

Launch: ``torchrun --nproc_per_node N -m rlhfkit <stage> ...`` (gloo on CPU; on GPUs nccl for
CUDA tensors and gloo for the CPU ones, see ``backend``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def backend() -> str:
    """gloo without CUDA. With CUDA, nccl for CUDA tensors and gloo for CPU ones: the stop flags,
    the metric means and the score statistics are small CPU tensors, which nccl alone refuses
    ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> None:
    """Join the process group that torchrun describes in the environment (no-op without it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        # N processes on the same cores: one thread each, or they slow each other down ~10x
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group(backend())


def shutdown() -> None:
    """Leave the process group: every rank first waits for the others (no rank tears its gloo
    pairs down while another still sends), then destroys it. Exiting with it still up let gloo's
    threads abort a rank at exit now and then ("terminate called without an active exception",
    seen in the 2-process tests; pytorch/pytorch#179291 describes the interpreter-teardown race)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def wrap(module: torch.nn.Module, strategy: str = "ddp") -> torch.nn.Module:
    """The module that training calls. ``ddp``: DistributedDataParallel over the process group
    (every rank holds all weights; gradients are averaged in backward). ``fsdp``: ``shard`` in
    place. In a single process, the module itself. Build optimizers after wrapping: FSDP2 replaces
    the parameters."""
    if not dist.is_initialized():
        return module
    if strategy == "fsdp":
        return shard(module)
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def shard(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) in place: every transformer block is one unit (its weights are
    all-gathered just before it runs and freed after), the rest (embeddings, final norm, heads)
    is the root unit. Parameters, gradients and optimizer state are split across ranks; gradients
    are reduce-scattered and averaged like DDP's. The blocks are the classes HF lists in
    ``_no_split_modules``. No-op in a single process."""
    if not dist.is_initialized():
        return module
    from torch.distributed.fsdp import fully_shard

    blocks: set[str] = set()
    for m in module.modules():
        blocks |= set(getattr(m, "_no_split_modules", None) or ())
    for m in module.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(module)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextmanager
def full_weights(module: torch.nn.Module) -> Iterator[None]:
    """FSDP2: all-gather every unit's weights once and keep them until the block ends. Generation
    runs one forward per token and ranks stop after different numbers of tokens, so no
    collective may run inside it. A no-op for unsharded modules."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.set_reshard_after_forward(True, recurse=False)
            u.reshard()


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full (unsharded) tensors, on CPU, materialised on rank 0 only
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The consolidated weights of a sharded module (a collective: every rank calls it; rank 0 gets
    the tensors, the others an empty dict). None for an unsharded module: use its own."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options())


def optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()``, consolidated over ranks when ``module`` is sharded (collective)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full_options())


def load_optimizer_state(module: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of ``optimizer_state``: every rank reads the full state and keeps its own shard."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        module, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
