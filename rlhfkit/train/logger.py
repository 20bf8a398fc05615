"""Metric logging to stdout, JSONL, TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rlhfkit.config import LogConfig
from rlhfkit.train.dist import is_main


class MetricLogger:
    def __init__(
        self,
        output_dir: str | Path,
        cfg: LogConfig,
        run_config: dict[str, Any] | None = None,
        resume_step: int = 0,
    ):
        """resume_step: the step of the checkpoint a run resumes from. Lines logged after it by the
        interrupted run are dropped, so that the resumed log equals an uninterrupted one."""
        self.dir = Path(output_dir)
        self.enabled = is_main()  # data-parallel runs log once, from rank 0
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.dir / "metrics.jsonl", resume_step)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        self._wandb = None
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project, config=run_config, dir=str(self.dir)
            )

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        """One row ``{"step": step, **metrics}``; nothing when ``metrics`` is empty (a run
        without held-out data evaluates to {}: no row without metrics)."""
        if not self.enabled or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if echo:
            parts = " ".join(f"{k}={v:.4g}" for k, v in clean.items())
            print(f"[step {step}] {parts}", file=sys.stderr, flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
        with open(self.dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"--- step {step} {tag}\n{text}\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    p = Path(output_dir) / "metrics.jsonl"
    return (
        [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        if p.exists()
        else []
    )
