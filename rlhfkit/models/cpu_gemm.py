"""fp32 linear layers on the CPU through oneDNN's matmul instead of MKL's sgemm.

PyTorch's CPU wheel runs an fp32 ``nn.Linear`` through MKL's ``sgemm``. On the AMD EPYC machines
this project runs on that reaches ~180 GFLOP/s on 2 cores, while oneDNN, which ships in the same
wheel, reaches ~400 on the same products; at the few rows of a decode step (M = 32-64) MKL gets
~90 GFLOP/s and oneDNN ~230 (``benchmarks/cpu_gemm.py``, benchmarks/RESULTS.md session 8).

``use_onednn(model)`` turns every ``nn.Linear`` of a model into a ``OneDNNLinear``: the same module
(same parameters, state dict and ``isinstance``), whose forward runs the three products of a linear
layer on oneDNN when the input and weights are fp32 on the CPU:

    forward     y  = x W^T + b
    backward    dx = dy W        dW = dy^T x        db = sum over rows of dy

Anything else (another dtype, bf16 autocast, a GPU, ``torch.compile`` tracing, a build without the
op) takes ``F.linear`` as before.

oneDNN is not faster everywhere: on one AVX-512 EPYC its weight gradient ran at 0.7-1.4x torch's
(0.69x on SmolLM2's LM head; issue 35). With ``model.cpu_gemm: auto`` (the default) each product
of a training step (forward, dx, dW) is timed once per shape class on both kernels, A B A B, and
the faster one runs from then on (``Choices``); the choices are kept on disk per machine, so a
rerun on the same machine makes the same ones. Products too small to time (< ``TIMED_MACS``
multiply-adds) stay on oneDNN. The results equal ``F.linear``'s up to fp32 rounding: another
GEMM sums the K products in another order (tests/test_cpu_gemm.py bounds it against float64).

Inside a ``packed_weights()`` scope (a rollout, DPO's reference precompute) the no-grad forwards
run on weights reordered once into oneDNN's layout instead of on every call; bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
# packed_weights' reordering; RLHFKIT_PACKED_WEIGHTS=0 turns it off (plain weights, one weight
# copy less memory inside the scopes)
_REORDER = (
    getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    if os.environ.get("RLHFKIT_PACKED_WEIGHTS", "1") != "0"
    else None
)


def available() -> bool:
    """Whether this torch build has oneDNN's linear op (CPU wheels do)."""
    return _OP is not None and torch.backends.mkldnn.is_available()


def _mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T (+ bias) on oneDNN. ``a`` and ``b`` may be transposed views."""
    return _OP(a, b, bias, "none", [], "")


def _torch_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product on torch's kernel (MKL's sgemm in the CPU wheel)."""
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


KERNELS = {"onednn": _mm_nt, "torch": _torch_nt}
# below ~10 ms of work (~1e9 multiply-adds) a product stays on oneDNN untimed: a timing that
# short is noise on a shared 2-core machine, and tiny models keep one path on every machine
TIMED_MACS = 1 << 30


def _bucket(d: int) -> int:
    """A dimension's class: rounded up to a power of two (a micro-batch's rows vary)."""
    return 1 << max(d - 1, 0).bit_length()


def machine_key() -> str:
    """What a kernel timing depends on besides the shape: the CPU, its ISA caps, the threads and
    torch. Choices made under one key are not reused under another."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    caps = [os.environ.get(v, "") for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")]
    text = json.dumps([cpu, isa, caps, torch.__version__, torch.get_num_threads()])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class Choices:
    """The faster kernel per shape class on this machine: measured at a class's first product (A
    B A B, the minimum of two timings each; the chosen kernel's result is the product's, so the
    cost is three extra products once per class), then remembered in memory and in
    ``RLHFKIT_CACHE_DIR`` (default ~/.cache/rlhfkit) under the machine's key."""

    def __init__(self, directory: str | Path | None = None):
        base = directory or os.environ.get("RLHFKIT_CACHE_DIR") or Path.home() / ".cache/rlhfkit"
        self.path = Path(base) / f"cpu_gemm-{machine_key()}.json"
        self.made: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}  # measured in this process, for reports
        self._lock = threading.Lock()
        with contextlib.suppress(OSError, ValueError):  # none saved yet (or unreadable): measure
            saved = json.loads(self.path.read_text())
            self.made = {k: v for k, v in saved.items() if v in KERNELS}

    @staticmethod
    def key(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> str:
        (m, k), n = a.shape, b.shape[0]
        layout = ("t" if a.stride(0) == 1 and m > 1 else "n") + ("t" if b.stride(0) == 1 else "n")
        return f"{_bucket(m)}x{_bucket(k)}x{_bucket(n)}/{layout}{'+b' if bias is not None else ''}"

    def product(self, a, b, bias=None) -> torch.Tensor:
        """a @ b^T (+ bias) on the faster kernel of its class."""
        if a.shape[0] * a.shape[1] * b.shape[0] < TIMED_MACS:
            return KERNELS["onednn"](a, b, bias)
        key = self.key(a, b, bias)
        choice = self.made.get(key)
        if choice in KERNELS:
            return KERNELS[choice](a, b, bias)
        best, out = {}, {}
        for _ in range(2):  # A B A B
            for name, f in KERNELS.items():
                t = time.perf_counter()
                out[name] = f(a, b, bias)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        choice = min(best, key=best.get)
        self.timings[key] = best
        self._remember(key, choice)
        return out[choice]

    def _remember(self, key: str, choice: str) -> None:
        with self._lock:
            self.made[key] = choice
            saved = {}
            with contextlib.suppress(OSError, ValueError):  # another process's, saved meanwhile
                saved = dict(json.loads(self.path.read_text()))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(saved | self.made, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only home: the choice holds for this process only


_CHOICES: Choices | None = None


def choices() -> Choices:
    """This process's ``Choices`` (made at the first timed product)."""
    global _CHOICES
    if _CHOICES is None:
        _CHOICES = Choices()
    return _CHOICES


def mm_nt(a: torch.Tensor, b: torch.Tensor, bias=None, kernel: str = "onednn") -> torch.Tensor:
    """a (M, K) @ b (N, K)^T (+ bias): on oneDNN, or with ``kernel="auto"`` on the faster of
    oneDNN and torch for its shape class on this machine (``Choices``)."""
    return choices().product(a, b, bias) if kernel == "auto" else _mm_nt(a, b, bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, kernel):
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight)
        ctx.has_bias, ctx.kernel = bias is not None, kernel
        return mm_nt(x2, weight, bias, kernel)

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        g = g.contiguous()  # an expanded or sliced gradient: oneDNN wants plain strides
        on = ctx.kernel
        gx = mm_nt(g, weight.t(), None, on) if ctx.needs_input_grad[0] else None  # (M,N) @ (N,K)
        gw = mm_nt(g.t(), x2.t(), None, on) if ctx.needs_input_grad[1] else None  # (N,M) @ (M,K)
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    f32 = torch.float32
    return (
        x.device.type == "cpu"
        and x.dtype == f32
        and weight.dtype == f32
        and weight.is_contiguous()
        and (bias is None or bias.dtype == f32)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "onednn"
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where it applies (see the module docstring); with
    ``kernel="auto"`` the products that record a gradient take the faster kernel per shape class."""
    if _OP is None or not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out = _Linear.apply(x2, weight, bias, kernel) if needs_grad else _mm_nt(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class _PackScopes(threading.local):
    """The weights packed inside ``packed_weights`` scopes: layer id -> (weak reference to the
    weight, its storage address, its version, the packed copy). ``depth`` counts the open
    scopes; the copies go when the last one closes. Per thread: a rollout worker's open scope
    (``rollout.max_staleness``) must not pack the weights the trainer's optimizer changes."""

    def __init__(self) -> None:
        self.depth = 0
        self.by_layer: dict[int, tuple] = {}


_Packs = _PackScopes()


@contextmanager
def packed_weights():
    """Inside this scope, a ``OneDNNLinear``'s forwards that record no gradient and have more than
    one row run on a copy of its weight reordered once into oneDNN's blocked layout, made at the
    layer's first such call; outside, every call reorders the plain weight on the fly. For a
    rollout (generation, then the old/reference forwards: the weights do not change) that is
    25-35% off a decode step's linears, which stream every weight once per token, and 5-15% off
    large forwards (benchmarks/RESULTS.md session 10). Results are bit-identical to the plain
    weight's (tests/test_cpu_gemm.py); one row takes the plain weight, whose matrix-vector kernel
    rounds differently. Costs one copy of the weights used inside the scope
    (``RLHFKIT_PACKED_WEIGHTS=0``: none, and no reordering).

    Not used in training: packing W and W^T between optimizer steps made a SmolLM2 micro-batch's
    forward and backward slower in place (22.3 vs 21.0 s), though each product alone was faster.

    The copy is keyed to the weight tensor, its storage and its version counter, so a weight
    swapped, resharded or changed in place is packed again. The optimizer must not step inside the
    scope all the same: fused AdamW writes parameters without bumping their version."""
    _Packs.depth += 1
    try:
        yield
    finally:
        _Packs.depth -= 1
        if _Packs.depth == 0:
            _Packs.by_layer.clear()


def _packed(layer: nn.Linear) -> torch.Tensor:
    """The layer's packed weight in the open scope (made now if new or stale)."""
    w = layer.weight
    entry = _Packs.by_layer.get(id(layer))
    if entry is not None and entry[0]() is w and entry[1:3] == (w.data_ptr(), w._version):
        return entry[3]
    packed = _REORDER(w.detach(), None)
    _Packs.by_layer[id(layer)] = (weakref.ref(w), w.data_ptr(), w._version, packed)
    return packed


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``cpu_gemm.linear`` (on a reordered copy of the weight
    inside a ``packed_weights`` scope). Made by ``use_onednn`` by swapping the class of an
    existing layer, so parameters, hooks and the state dict stay as they were. ``gemm_kernel``:
    "onednn", or "auto" (the products that record a gradient on the faster kernel, ``Choices``)."""

    gemm_kernel = "onednn"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if not _Packs.depth or _REORDER is None:  # no scope open (training): as before
            return linear(input, w, b, self.gemm_kernel)
        recorded = torch.is_grad_enabled() and (
            input.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        )
        if (
            not recorded  # a gradient keeps the plain weight (see packed_weights)
            and input.numel() > input.shape[-1]  # more than one row
            and _eligible(input, w, b)
        ):
            x2 = input.reshape(-1, input.shape[-1])
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            return _mm_nt(x2, _packed(self), b).view(*input.shape[:-1], w.shape[0])
        return linear(input, w, b, self.gemm_kernel)


def use_onednn(model: nn.Module, kernel: str = "onednn") -> int:
    """Route every plain ``nn.Linear`` of ``model`` through oneDNN (in place); ``kernel="auto"``:
    each product that records a gradient on the faster of oneDNN and torch for its shape class
    (``Choices``). Returns how many layers were switched (0 when this torch build lacks the op)."""
    if kernel not in ("onednn", "auto"):
        raise ValueError(f"cpu_gemm kernel: 'onednn' or 'auto', not {kernel!r}")
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            m.gemm_kernel = kernel
            n += 1
    return n


def use_torch(model: nn.Module) -> None:
    """Undo ``use_onednn``: plain ``nn.Linear`` layers again."""
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
            m.__dict__.pop("gemm_kernel", None)
