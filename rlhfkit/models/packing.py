"""Padding-free forwards: a batch's rows packed into one sequence (``model.padding_free``).

A rollout batch is ``[left-padded prompt | right-padded response]``: every row is as wide as
the longest prompt plus the longest response, and the matmuls of the padding are paid for in
the reference forward and in every forward and backward of the update (11% of a SmolLM2 GRPO
update's matmul work on the RLVR task, where prompt lengths vary; more where responses end
early). verl calls the remedy ``use_remove_padding``, TRL ``padding_free``: the real tokens of
all rows are laid end to end as one row of N tokens, each row's positions counted from 0, so
every linear layer, norm and MLP sees only real tokens.

Only attention must keep the rows apart. Here it gathers the packed queries, keys and values
into a batch of rows that each start at column 0 (padding at the right) and runs SDPA with
``is_causal=True`` and no mask: a real token never looks to its right, so it never sees
padding, and the batched kernel runs as fast as the padded forward's did (a loop of one SDPA
call per row was 35% slower in backward on 2 cores: its kernel splits work over batch x heads).
The outputs of the real tokens are gathered back. RoPE reads the packed position ids.

``packed_attention(model, lengths)`` routes a forward through this for its duration: the HF
config's attention implementation is set to ``rlhfkit_packed`` (registered below, with a mask
function that builds no mask) and the row layout sits in a context variable. Without that
variable the same two functions are HF's SDPA attention and mask, so another thread's forward
on the same model is unchanged. The autograd graph holds plain ops, so backward runs outside
the context. fp32 results equal the padded forward's up to rounding (tests/test_packed_forward.py);
below fp32 a layout changes logprobs beyond rounding, so the RL loop packs in fp32 only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "rlhfkit_packed"
# decoder families whose attention reads ``ALL_ATTENTION_FUNCTIONS`` and RoPE position ids, with
# full (not sliding-window) attention in every layer: checked by ``packable``, tested each
PACKABLE_TYPES = {"llama", "qwen2", "qwen3"}


@dataclass(frozen=True)
class Rows:
    """Where each packed token sits in a right-padded (rows, width) batch and back."""

    gather: torch.Tensor  # (rows * width,) packed index of each cell; 0 for padding cells
    scatter: torch.Tensor  # (N,) the cell of each packed token
    rows: int
    width: int


def rows_of(lengths: torch.Tensor) -> Rows:
    """The layout of rows of ``lengths`` (R,) real tokens packed end to end."""
    r, w = lengths.numel(), int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths  # (R,)
    col = torch.arange(w, device=lengths.device)
    real = col[None] < lengths[:, None]  # (R, W)
    gather = torch.where(real, starts[:, None] + col[None], 0).flatten()
    scatter = real.flatten().nonzero().squeeze(1)  # row-major: the packed order
    return Rows(gather, scatter, r, w)


_rows: ContextVar[Rows | None] = ContextVar("rlhfkit_packed_rows", default=None)


def _to_rows(x: torch.Tensor, layout: Rows) -> torch.Tensor:
    """(1, H, N, D) packed -> (R, H, W, D), each row from column 0."""
    h, d = x.shape[1], x.shape[3]
    return x[0].index_select(1, layout.gather).view(h, layout.rows, layout.width, d).transpose(0, 1)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layout = _rows.get()
    if layout is None:  # not inside ``packed_attention``: HF's SDPA attention, unchanged
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out, _ = sdpa_attention_forward(
        module,
        _to_rows(query, layout),
        _to_rows(key, layout),
        _to_rows(value, layout),
        None,
        dropout=dropout,
        scaling=scaling,
        is_causal=True,
    )  # (R, W, H, D)
    out = out.reshape(layout.rows * layout.width, *out.shape[2:]).index_select(0, layout.scatter)
    return out.unsqueeze(0), None  # (1, N, H, D)


def _mask(*args, **kwargs):
    return None if _rows.get() is not None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, _mask)


def hf_config(model):
    """The HF config of a model, through DDP/FSDP (``.module``), PEFT and our adapters
    (``.model``: ``PerTokenScalar``); None if none."""
    for _ in range(8):
        cfg = getattr(model, "config", None)
        if cfg is not None:
            return cfg
        inner = getattr(model, "module", None)
        model = inner if inner is not None else getattr(model, "model", None)
        if model is None:
            return None
    return None


def packable(model) -> bool:
    """Whether ``model`` runs packed: a family of ``PACKABLE_TYPES`` on HF's SDPA attention, every
    layer full attention, and no activation checkpointing: a checkpointed layer recomputes its
    forward in backward, outside ``packed_attention``, where its attention would run over the
    whole packed row as one sequence."""
    cfg = hf_config(model)
    if cfg is None or getattr(cfg, "model_type", None) not in PACKABLE_TYPES:
        return False
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return False
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    sliding = getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)
    return (
        cfg._attn_implementation == "sdpa"
        and not sliding
        and all(t == "full_attention" for t in layer_types)
    )


# per HF config object (by id: configs define __eq__, so they are not hashable): how many
# packed forwards are inside it now, and the implementation to restore when the last one leaves
_inside: dict[int, list] = {}
_inside_lock = threading.Lock()


@contextmanager
def packed_attention(model, lengths: torch.Tensor):
    """Run ``model``'s forwards on one packed row of rows of ``lengths`` (R,) tokens (see the
    module's docstring). The caller passes ``input_ids`` and ``position_ids`` of shape (1, N)
    and no attention mask. Two threads may run packed forwards on one model at once: the config
    keeps ``rlhfkit_packed`` until the last of them leaves."""
    cfg = hf_config(model)
    with _inside_lock:
        entry = _inside.setdefault(id(cfg), [0, cfg._attn_implementation])
        entry[0] += 1
        cfg._attn_implementation = PACKED
    token = _rows.set(rows_of(lengths))
    try:
        yield
    finally:
        _rows.reset(token)
        with _inside_lock:
            entry[0] -= 1
            if entry[0] == 0:
                cfg._attn_implementation = entry[1]
                del _inside[id(cfg)]
