"""Masked statistics over right-padded (B, T) tensors, and a running reward normaliser.

Padded positions may hold anything (garbage, NaN-free); every function here multiplies by
the mask before reducing, so garbage never reaches an output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``torch.where`` (not ``x * mask``) so inf/NaN garbage in pads stays out."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 where the mask is empty)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected by default, like ``torch.var``)."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    return sq / denom


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    keep_mean: bool = False,
    eps: float = 1e-8,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale the masked entries to unit variance; centre them too unless ``keep_mean``.

    Keeping the mean is what PPO implementations do for rewards (only the scale changes) and
    what they do not do for advantages (centred). Padded positions come back as 0.
    mean/var: statistics to use instead of this batch's (e.g. all-reduced over ranks).
    """
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    out = (x - mean) * torch.rsqrt(var + eps)
    if keep_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


def explained_variance(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var[target - pred] / Var[target]: 1 is a perfect critic, 0 predicts the mean, < 0 is worse."""
    var_t = masked_var(target, mask)
    return 1.0 - masked_var(target - pred, mask) / var_t.clamp(min=1e-12)


@dataclass
class RunningMeanStd:
    """Running mean and variance of a scalar stream (Chan et al. parallel update).

    Used to normalise RM scores when the reward model stores no reference statistics.
    ``update`` takes batch moments so that a distributed caller can all-reduce them first.
    """

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        self.update_from_moments(float(x.mean()), float(x.var(unbiased=False)), float(x.numel()))

    def update_from_moments(self, batch_mean: float, batch_var: float, batch_count: float) -> None:
        if batch_count <= 0:
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = (
            self.var * self.count
            + batch_var * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean += delta * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def clip_abs(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Clamp to [-bound, bound]; ``None`` leaves ``x`` unchanged (used for reward clipping)."""
    return x if bound is None else x.clamp(-bound, bound)
