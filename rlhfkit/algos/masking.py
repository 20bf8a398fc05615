"""Response masks: where a sampled response ends. Every module uses these two functions."""

from __future__ import annotations

import torch


def response_mask(tokens: torch.Tensor, stop_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row, 0 after it. (B, T) -> (B, T) bool.

    A row with no stop token (truncated at max length) is all ones.
    """
    stop = torch.as_tensor(stop_ids, device=tokens.device)
    is_stop = torch.isin(tokens, stop)  # (B, T)
    # number of stop tokens strictly before t; a token is kept while that count is 0
    before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    return before == 0


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded (B, T) mask; 0 for an empty row. (B,)"""
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... of the real tokens of each row, counted from its first real token
    (left padding gets 0). (B, L) -> (B, L) long. Every forward over padded rows uses this."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def pack_left(
    x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's masked entries to its front, in order; zeros after them. (B, T) ->
    (packed (B, T), packed_mask (B, T) bool, order (B, T) for ``unpack``). A right-padded mask
    packs to itself; a mask with holes (a multi-turn episode's environment tokens) closes them,
    so that a recursion over "the next token" runs over the masked tokens only."""
    m = mask.bool()
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # masked positions first
    packed_mask = torch.arange(m.shape[1], device=m.device)[None] < m.sum(1, keepdim=True)
    return pack_like(x, order, packed_mask), packed_mask, order


def pack_like(x: torch.Tensor, order: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
    """Another (B, T) tensor packed with ``pack_left``'s ``order`` and ``packed_mask`` (the
    same mask's packing, without sorting again)."""
    return torch.where(
        packed_mask, x.gather(1, order), torch.zeros((), dtype=x.dtype, device=x.device)
    )


def unpack(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_left``: entries back at their positions, zeros at the unmasked
    ones (``packed`` is zero past each row's count). (B, T) -> (B, T)"""
    return torch.zeros_like(packed).scatter(1, order, packed)
