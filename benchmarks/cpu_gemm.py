"""fp32 linear-layer products on this CPU: torch's kernel (F.linear, MKL's sgemm in the CPU wheel)
against oneDNN's matmul (``rlhfkit.models.cpu_gemm``, what ``model.cpu_gemm: onednn`` runs), for
the three products of a linear layer (forward y = x W^T, backward dx = dy W and dW = dy^T x), at
the shapes of the benchmark models' decode steps (M = 32-64 rows) and training micro-batches
(M = 1280-5000), plus the largest difference between the two forwards.

    .venv/bin/python benchmarks/cpu_gemm.py

Each figure is the median of repeats, A B A B, over several copies of the weight so that a
decode-sized product reads its weight from memory as in a real step.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from rlhfkit.models import cpu_gemm  # noqa: E402

# (what, M rows, K in, N out)
SHAPES = [
    ("tiny decode, MLP up", 64, 256, 1024),
    ("tiny decode, LM head", 64, 256, 8192),
    ("small decode, MLP up", 64, 512, 2048),
    ("SmolLM2 decode, MLP up", 32, 576, 1536),
    ("SmolLM2 decode, MLP down", 32, 1536, 576),
    ("SmolLM2 decode, LM head", 32, 576, 49152),
    ("tiny update, MLP up", 1280, 256, 1024),
    ("small update, MLP up", 1280, 512, 2048),
    ("SmolLM2 update, MLP up", 5000, 576, 1536),
    ("SmolLM2 update, LM head", 5000, 576, 49152),
]


def _time(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    if not cpu_gemm.available():
        raise SystemExit("this torch build has no oneDNN linear op")
    torch.manual_seed(0)
    print(f"machine: {common.machine()}; {common.threads()} threads; torch {torch.__version__}")
    peaks = {k: common.matmul_peak_gflops(torch.float32, kernel=k) for k in ("torch", "onednn")}
    print("fp32 peak (1024^3, best over 1.5 s): " + ", ".join(f"{k} {v:.0f} GFLOP/s"
                                                              for k, v in peaks.items()))  # fmt: skip
    # model.cpu_gemm: auto's choices, made afresh here (not read from ~/.cache/rlhfkit)
    choices = cpu_gemm.Choices(tempfile.mkdtemp())
    print("\n| product | M x K x N | torch GFLOP/s fwd / dx / dW | oneDNN GFLOP/s fwd / dx / dW "
          "| speed-up fwd / dx / dW | auto's choice fwd / dx / dW | max abs diff fwd |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for what, m, k, n in SHAPES:
        print(row(what, m, k, n, choices))


def row(what: str, m: int, k: int, n: int, choices: cpu_gemm.Choices) -> str:
    """One shape's table row: the three products on both kernels, A B A B, and the kernel that
    ``model.cpu_gemm: auto`` picks for each (``choices``: one short timing at the first use)."""
    dnn = cpu_gemm._mm_nt
    copies = max(1, min(16, int(64e6 // (4 * k * n))))  # ~64 MB of weights: out of cache
    ws = [torch.randn(n, k) / k**0.5 for _ in range(copies)]
    x, g = torch.randn(m, k), torch.randn(m, n)
    reps = 30 if m < 256 else 5
    i = [0]

    def w() -> torch.Tensor:
        i[0] = (i[0] + 1) % copies
        return ws[i[0]]

    ops = {
        "torch": (
            lambda: torch.nn.functional.linear(x, w()),
            lambda: g @ w(),
            lambda: g.t() @ x,
        ),
        "onednn": (lambda: dnn(x, w()), lambda: dnn(g, w().t()), lambda: dnn(g.t(), x.t())),
    }
    times: dict[str, list[list[float]]] = {kind: [[], [], []] for kind in ops}
    for _ in range(2):  # A B A B
        for kind, fs in ops.items():
            for j, f in enumerate(fs):
                times[kind][j].append(_time(f, reps))
    picked = []
    for a, b in ((x, ws[0]), (g, ws[0].t()), (g.t(), x.t())):
        choices.product(a, b)  # untimed under cpu_gemm.TIMED_MACS: no choice is made
        picked.append(choices.made.get(choices.key(a, b, None), "onednn (small)"))
    flop = 2 * m * k * n
    rate = {kind: [flop / min(t) / 1e9 for t in ts] for kind, ts in times.items()}
    diff = float((dnn(x, ws[0]) - torch.nn.functional.linear(x, ws[0])).abs().max())
    up = " / ".join(f"{b / a:.2f}x" for a, b in zip(rate["torch"], rate["onednn"], strict=True))
    return (f"| {what} | {m} x {k} x {n} | {_fmt(rate['torch'])} | {_fmt(rate['onednn'])} | "
            f"{up} | {' / '.join(picked)} | {diff:.1e} |")  # fmt: skip


def _fmt(v: list[float]) -> str:
    return " / ".join(f"{a:.0f}" for a in v)


if __name__ == "__main__":
    main()
