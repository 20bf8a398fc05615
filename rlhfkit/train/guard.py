"""Guards for long runs: a graceful stop on SIGINT/SIGTERM, and skipping non-finite updates."""

from __future__ import annotations

import signal
import sys

import torch


class StopRequested(Exception):
    """Raised after the checkpoint that a SIGINT/SIGTERM asked for has been written."""

    def __init__(self, signum: int):
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; a checkpoint was saved, rerun to resume"
        )
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses / rewards / gradients in a row."""


class StopOnSignal:
    """Within the ``with`` block, SIGINT/SIGTERM only set ``signum``; the loop checks it at a safe
    point (after an optimizer step or an iteration), saves a checkpoint and raises StopRequested."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopOnSignal:
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class NonFiniteGuard:
    """Counts consecutive non-finite updates; raises TrainingDiverged after ``max_in_a_row``."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    def check(self, ok: bool, where: str) -> bool:
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        print(
            f"warning: non-finite {where}; update skipped ({self.in_a_row} in a row)",
            file=sys.stderr,
            flush=True,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite updates in a row (last: {where}); stopping. Lower the learning "
                "rate, check the data, or resume from the last checkpoint."
            )
        return False


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
