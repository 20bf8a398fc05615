"""Fused fp32 CPU blocks for Llama-family models: fewer saved activations, fewer passes over memory.

On the CPUs this project runs on, a training step's time beyond the matmuls goes to memory: the
activations autograd keeps for backward (~50 KB per token per layer for a HF Llama in fp32, ~8 GB
for a 16 x 338-token SmolLM2 micro-batch) are written once, read back once, and, the first time a
process reaches a new high-water mark, page-faulted in at ~0.5-1 GB/s (benchmarks/RESULTS.md,
session 9). Liger-Kernel does the same on GPUs with Triton; here it is plain torch ops.

``fuse_blocks(model)`` swaps the class of each recognized module (as ``cpu_gemm.use_onednn``
does for linear layers), so parameters, state dict, hooks and ``from_pretrained`` of what we write
are unchanged:

    SwiGLU MLP   y = W_d (silu(W_g x) * W_u x)
                 saves x, W_g x and W_u x; silu(.) and the product are recomputed in backward
                 (HF's graph also keeps both: 2 x intermediate_size floats per token)
    RMSNorm      y = w * x / sqrt(mean(x^2) + eps)
                 saves x and the per-row 1/rms; backward in closed form
                 (HF's graph also keeps the normalized x: hidden_size floats per token)

The forward runs HF's own ops in HF's order, so its outputs are bit-identical; the gradients are
equal up to fp32 rounding (tests/test_cpu_fused.py checks both against float64). Anything else
(another dtype, autocast, a GPU, compile tracing, adapters or biases on the MLP's layers) runs the
module's original forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlhfkit.models import cpu_gemm

# classes with HF's Llama RMSNorm / SwiGLU-MLP forward (same attributes, same math)
RMSNORM_CLASSES = {
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Olmo2RMSNorm",
}
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
SILU_CLASSES = {"SiLU", "SiLUActivation"}  # torch's, and transformers' F.silu module


def _fast(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """fp32 on the CPU, eager, no autocast: where the fused blocks apply (``cpu_gemm``'s test)."""
    return all(cpu_gemm._eligible(x, p, None) for p in params)


def _mm(a: torch.Tensor, b: torch.Tensor, kernel: str | None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T: as the layers' ``cpu_gemm`` kernel ("onednn" or "auto") when they
    are ``OneDNNLinear``, else (None) torch's."""
    return cpu_gemm.mm_nt(a, b, None, kernel) if kernel else a @ b.t()


# ---------------------------------------------------------------------------------- SwiGLU MLP


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, wg, wu, wd, kernel):
        g = _mm(x2, wg, kernel)  # (M, I)
        u = _mm(x2, wu, kernel)
        y = _mm(F.silu(g) * u, wd, kernel)  # HF: act_fn(gate_proj(x)) * up_proj(x), down_proj
        ctx.save_for_backward(x2, g, u, wg, wu, wd)
        ctx.kernel = kernel
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, wg, wu, wd = ctx.saved_tensors
        on, need = ctx.kernel, ctx.needs_input_grad
        dy = dy.contiguous()
        s = F.silu(g)  # recomputed: not kept from forward
        dwd = _mm(dy.t(), (s * u).t(), on) if need[3] else None  # dy^T h, h = silu(g) * u
        dh = _mm(dy, wd.t(), on)  # (M, I)
        du = s.mul_(dh)  # dL/du = dh * silu(g), in s's memory
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)  # dL/dg = dh * u * silu'(g)
        dx = _mm(dg, wg.t(), on).add_(_mm(du, wu.t(), on)) if need[0] else None
        dwg = _mm(dg.t(), x2.t(), on) if need[1] else None
        dwu = _mm(du.t(), x2.t(), on) if need[2] else None
        return dx, dwg, dwu, dwd, None


def _plain(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, cpu_gemm.OneDNNLinear) and layer.bias is None


class FusedSwiGLU(nn.Module):
    """A HF SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) whose fp32 CPU forward
    keeps 2 intermediate-size activations per token instead of 4. Made by ``fuse_blocks``."""

    _hf_forward = None  # the original class's forward, set per swapped class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        w = [m.weight for m in layers]
        grads = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in w))
        if not (grads and all(_plain(m) for m in layers) and _fast(x, *w)):
            return self._hf_forward(x)  # nothing to save without autograd: HF's forward as is
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        kernel = (  # swapped only where available
            self.gate_proj.gemm_kernel if type(self.gate_proj) is cpu_gemm.OneDNNLinear else None
        )
        y = _SwiGLU.apply(x2, *w, kernel)
        return y.view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------------ RMSNorm


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # HF's ops in HF's order: bit-identical output
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x * r)

    @staticmethod
    def backward(ctx, dy):
        # y = w * n, n = x r, r = (mean(x^2) + eps)^-1/2:
        #   dL/dw = sum over rows of dy * n;   dL/dx = r (dy w - n mean(dy w n))
        x, weight, r = ctx.saved_tensors
        n = x * r
        dw = (dy * n).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gn = dy * weight
        dot = (gn * n).mean(-1, keepdim=True)
        dx = gn.sub_(n.mul_(dot)).mul_(r)
        return dx, dw, None


class FusedRMSNorm(nn.Module):
    """A HF Llama-style RMSNorm (``weight``, ``variance_epsilon``) whose fp32 CPU forward keeps
    the input and one scalar per row for backward. Made by ``fuse_blocks``."""

    _hf_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grads = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not (grads and _fast(x, self.weight)):
            return self._hf_forward(x)
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


# ------------------------------------------------------------------------------ the class swap

_SWAPPED: dict[type, type] = {}  # HF class -> its fused subclass (one per HF class)


def _fused_class(cls: type, base: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Fused{cls.__name__}", (base, cls), {"_hf_forward": cls.forward})
    return _SWAPPED[cls]


def _mlp_ok(m: nn.Module) -> bool:
    act = type(getattr(m, "act_fn", None)).__name__
    return act in SILU_CLASSES and all(
        isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


def fuse_blocks(model: nn.Module) -> int:
    """Swap each recognized RMSNorm and SwiGLU MLP of ``model`` for its fused subclass (in
    place). Returns how many modules were swapped."""
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name in RMSNORM_CLASSES and hasattr(m, "variance_epsilon"):
            m.__class__ = _fused_class(type(m), FusedRMSNorm)
        elif name in MLP_CLASSES and _mlp_ok(m):
            m.__class__ = _fused_class(type(m), FusedSwiGLU)
        else:
            continue
        n += 1
    return n


def unfuse_blocks(model: nn.Module) -> None:
    """Undo ``fuse_blocks``: the HF classes again."""
    back = {v: k for k, v in _SWAPPED.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
