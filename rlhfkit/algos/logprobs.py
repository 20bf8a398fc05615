"""Per-token log pi(a_t|s_t) and policy entropy from logits, without a full fp32 log-softmax.

A (B, T, V) float32 log-softmax for B=64, T=256, V=50k is 3.3 GB. We process rows in chunks:
each chunk is upcast to float32, reduced to its logsumexp, and freed, so the float32 working
set is ``chunk_rows * V``. A custom autograd function recomputes the softmax chunk by chunk in
backward instead of letting autograd keep every chunk alive (same idea as OpenRLHF's and
Liger's fused cross-entropy).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 16 << 20  # a chunk's float32 working set: under glibc's 32 MB mmap ceiling, in L3


def chunk_rows_for(vocab: int, chunk_rows: int | None) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else as many as fit ``CHUNK_BYTES`` in float32
    (85 rows of a 49k vocabulary, 512 of 8k). Larger chunks were slower, not faster: a 200 MB
    temporary is mmap'd fresh by glibc at every allocation and page-faults in as it is written
    (log_softmax of 1024 x 49k rows ran at ~0.6 GB/s; issue 24). Rows are independent, so the
    chunking never changes a result."""
    return chunk_rows or max(1, CHUNK_BYTES // (4 * vocab))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are reduced in float32; float64 stays float64 (exact tests)
    return torch.promote_types(dtype, torch.float32)


def _chunk_forward(z: torch.Tensor, tok: torch.Tensor, need_entropy: bool):
    # z: (N, V) float32 logits / temperature; tok: (N,)
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logp = z.gather(-1, tok[:, None]).squeeze(-1) - lse
    if not need_entropy:
        return logp, None, lse
    logp_all = z - lse[:, None]  # one chunk only
    ent = -(logp_all.exp() * logp_all).sum(-1)  # not lse - sum(p z): that cancels badly in fp32
    return logp, ent, lse


def _scaled(chunk: torch.Tensor, work: torch.dtype, temperature: float) -> torch.Tensor:
    """logits / T in the working dtype; no copy at all for float32 logits at T = 1."""
    z = chunk.to(work)
    return z if temperature == 1.0 else z / temperature


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows, need_entropy, consume):
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)  # (N, V), N = B*T
        tok = tokens.reshape(-1)
        n = flat.shape[0]
        work = _work_dtype(logits.dtype)
        logp = torch.empty(n, dtype=work, device=logits.device)
        lse = torch.empty(n, dtype=work, device=logits.device)
        ent = torch.empty(n if need_entropy else 0, dtype=work, device=logits.device)
        for s in range(0, n, chunk_rows):
            z = _scaled(flat[s : s + chunk_rows], work, temperature)
            lp, h, lse[s : s + chunk_rows] = _chunk_forward(
                z, tok[s : s + chunk_rows], need_entropy
            )
            logp[s : s + chunk_rows] = lp
            if need_entropy:
                ent[s : s + chunk_rows] = h
        ctx.save_for_backward(logits, tokens, ent, lse)
        ctx.temperature, ctx.chunk_rows, ctx.need_entropy = temperature, chunk_rows, need_entropy
        ctx.consume = consume
        shape = tokens.shape
        return logp.view(shape), (ent.view(shape) if need_entropy else ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, tokens, ent, lse = ctx.saved_tensors
        temp, rows = ctx.temperature, ctx.chunk_rows
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        tok = tokens.reshape(-1)
        work = _work_dtype(logits.dtype)
        g_logp = g_logp.reshape(-1).to(work)
        use_ent = ctx.need_entropy and g_ent is not None and g_ent.numel() > 0
        g_ent = g_ent.reshape(-1).to(work) if use_ent else None
        # consume: the caller's logits are a temporary; their memory becomes the gradient (the
        # version counter makes a second backward through them fail, not read garbage)
        reuse = ctx.consume and flat.dtype == work and flat.is_contiguous()
        grad = flat if reuse else torch.empty_like(flat)
        in_place = grad.dtype == work  # fp32 logits: build each chunk's gradient in its own rows
        for s in range(0, flat.shape[0], rows):
            sl = slice(s, s + rows)
            # log p = z - lse, with the forward's lse (no second log-softmax), in place
            out = grad[sl] if in_place else None
            logp_all = torch.sub(_scaled(flat[sl], work, temp), lse[sl, None], out=out)
            # d logp_a / dz = onehot(a) - p;  dH/dz_k = -p_k (log p_k + H). Together:
            # dL/dz = onehot(a) g_logp - p (g_logp + (log p + H) g_ent), built in place
            if use_ent:
                p = logp_all.exp()
                coef = logp_all.add_(ent[sl, None]).mul_(g_ent[sl, None]).add_(g_logp[sl, None])
                gz = coef.mul_(p).neg_()
            else:
                gz = logp_all.exp_().mul_(-g_logp[sl, None])
            gz.scatter_add_(-1, tok[sl, None], g_logp[sl, None])
            if temp != 1.0:
                gz.div_(temp)  # z = logits / T
            if not in_place:
                grad[sl] = gz
        return grad.view_as(logits), None, None, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a_t|s_t) of the taken tokens and the entropy H(pi(.|s_t)), both (B, T).

    Outputs are float32 for fp32/bf16/fp16 logits (float64 for float64 logits).

    logits: (B, T, V) already aligned so that ``logits[:, t]`` predicts ``tokens[:, t]``.
    The distribution is softmax(logits / temperature): use the sampling temperature, or the
    ratio pi_new / pi_old compares two different distributions.

    consume: the logits are a temporary nobody reads after this (the LM head's output inside a
    forward): backward writes their gradient into their memory instead of a new (B, T, V) tensor.
    """
    rows = chunk_rows_for(logits.shape[-1], chunk_rows)
    return _LogprobEntropy.apply(logits, tokens, float(temperature), rows, True, consume)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    consume: bool = False,
) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], (B, T); see ``logprobs_and_entropy``."""
    rows = chunk_rows_for(logits.shape[-1], chunk_rows)
    return _LogprobEntropy.apply(logits, tokens, float(temperature), rows, False, consume)[0]


def full_kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Exact KL(pi || pi_ref) = sum_a pi(a) (log pi(a) - log pi_ref(a)) at each position, (B, T).

    The estimators in ``kl.py`` see only the sampled token; this sums over the whole vocabulary
    (lower variance, but needs both (B, T, V) logits at once). Not differentiated by PPO.
    """
    v = logits.shape[-1]
    a, b = logits.reshape(-1, v), ref_logits.reshape(-1, v)
    chunk_rows = chunk_rows_for(v, chunk_rows)
    out = []
    for s in range(0, a.shape[0], chunk_rows):
        work = _work_dtype(logits.dtype)
        lp = torch.log_softmax(a[s : s + chunk_rows].to(work) / temperature, -1)
        lq = torch.log_softmax(b[s : s + chunk_rows].to(work) / temperature, -1)
        out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])
