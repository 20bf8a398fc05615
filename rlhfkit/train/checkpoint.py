"""Atomic checkpoints: write into a temporary directory, then rename. A run killed at any moment
leaves the previous checkpoint intact. Layout of a run directory:

    output_dir/
      checkpoints/step-000120/   model/ (plain HF dir) [+ adapter/], trainer_state.pt, run_config.yaml
      final/                     plain HF dir + run_config.yaml (+ reward_stats.json for an RM)
      metrics.jsonl, tb/
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then atomically move tmp_dir to ``target`` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict[str, Any]:
    """Every generator a resumed run draws from: Python's, torch's CPU one, and the CUDA
    generator of every visible device (sampling and dropout-free training still draw from it)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise RuntimeError(
                f"the checkpoint holds the CUDA RNG of {len(state['cuda'])} devices, this machine "
                f"has {torch.cuda.device_count()}: an exact resume needs the same devices"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_model: Callable[[Path], None],
    trainer_state: dict[str, Any],
    run_config: dict[str, Any],
    keep_last: int,
) -> Path:
    """checkpoints/step-NNNNNN with the model, optimizer/scheduler/RNG/data position and config."""

    def write(tmp: Path) -> None:
        write_model(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        save_run_config(tmp, run_config)

    root = Path(output_dir) / "checkpoints"
    if root.is_dir():  # leftovers of a run killed while writing
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    path = write_atomic_dir(root / f"step-{step:06d}", write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = [p for p in list_checkpoints(output_dir) if (p / "trainer_state.pt").exists()]
    return ckpts[-1] if ckpts else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """weights_only: tensors, numbers, strings and containers only; no arbitrary pickle. Onto the
    CPU: rank 0 wrote its optimizer state from cuda:0, and every rank of a multi-GPU resume would
    otherwise load a full copy onto cuda:0; ``Optimizer.load_state_dict`` moves each state to its
    parameter's device, and the RNG states are CPU tensors anyway."""
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
