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
op) takes ``F.linear`` as before. The results equal ``F.linear``'s up to fp32 rounding: another
GEMM sums the K products in another order (tests/test_cpu_gemm.py bounds it against float64).

Inside a ``packed_weights()`` scope (a rollout, DPO's reference precompute) the no-grad forwards
run on weights reordered once into oneDNN's layout instead of on every call; bit-identical.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager

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


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _mm_nt(x2, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        g = g.contiguous()  # an expanded or sliced gradient: oneDNN wants plain strides
        gx = _mm_nt(g, weight.t()) if ctx.needs_input_grad[0] else None  # (M, N) @ (N, K)
        gw = _mm_nt(g.t(), x2.t()) if ctx.needs_input_grad[1] else None  # (N, M) @ (M, K)
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where it applies (see the module docstring)."""
    if _OP is None or not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out = _Linear.apply(x2, weight, bias) if needs_grad else _mm_nt(x2, weight, bias)
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
    existing layer, so parameters, hooks and the state dict stay as they were."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if not _Packs.depth or _REORDER is None:  # no scope open (training): as before
            return linear(input, w, b)
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
        return linear(input, w, b)


def use_onednn(model: nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through oneDNN (in place). Returns how many
    layers were switched (0 when this torch build lacks the op)."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def use_torch(model: nn.Module) -> None:
    """Undo ``use_onednn``: plain ``nn.Linear`` layers again."""
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
