"""The typed experience batch: everything the update needs, recorded once at rollout time."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, T) a_t, right-padded
    response_mask: torch.Tensor  # (B, T) bool
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t|s_t)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t|s_t)
    values: torch.Tensor | None  # (B, T) V_old(s_t); None without a critic
    scores: torch.Tensor  # (B,) R_final after normalisation, clipping and the missing-EOS penalty
    raw_scores: torch.Tensor  # (B,) R_final as the RM / reward function gave it
    stopped: torch.Tensor  # (B,) bool: ended on EOS / stop sequence
    group: torch.Tensor  # (B,) long: responses to the same prompt share a group id (all ranks)
    # (B, T) the sampler's own log pi(a_t|s_t), kept for ppo.rollout_correction (else None)
    sampler_logprobs: torch.Tensor | None = None
    # (B, T) bool: the model's own tokens of a multi-turn episode (an environment's turns are
    # 0); None = every response token (single turn). Losses, KL and entropy read ``loss_mask``
    action_mask: torch.Tensor | None = None
    # (B, T) an environment's per-turn rewards at the last token of each model turn
    # (env.reward_at: turn), added to r_t; None otherwise
    turn_rewards: torch.Tensor | None = None
    rewards: torch.Tensor | None = None  # (B, T) r_t
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) bool: the tokens the policy wrote, the only ones trained on."""
        return self.response_mask if self.action_mask is None else self.action_mask

    def __len__(self) -> int:
        return self.response.shape[0]

    def select(self, idx: torch.Tensor, trim: bool = True) -> Experience:
        """Rows ``idx``, with columns that are padding in every selected row trimmed away
        (``trim=False`` keeps the buffer's layout: bf16 logprobs depend on the padding)."""
        sub = Experience(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else v[idx])
                for f in fields(self)
            }
        )
        if not trim:
            return sub
        keep_p = sub.prompt_mask.any(0).nonzero()
        p0 = int(keep_p[0]) if len(keep_p) else sub.prompt_mask.shape[1] - 1
        t1 = max(int(sub.response_mask.sum(1).max()), 1)
        out = {}
        for f in fields(sub):
            v = getattr(sub, f.name)
            if v is not None and f.name.startswith("prompt"):
                v = v[:, p0:]
            elif v is not None and v.dim() == 2:
                v = v[:, :t1]
            out[f.name] = v
        return Experience(**out)


def _pad_cols(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat(chunks: list[Experience], pad_id: int) -> Experience:
    """Stack rollout chunks of different prompt/response widths (prompts left-, responses right-padded)."""
    p = max(c.prompt_ids.shape[1] for c in chunks)
    t = max(c.response.shape[1] for c in chunks)
    out = {}
    for f in fields(Experience):
        vals = [getattr(c, f.name) for c in chunks]
        if vals[0] is None:
            out[f.name] = None
            continue
        if f.name in ("prompt_ids", "prompt_mask"):
            fill = pad_id if f.name == "prompt_ids" else 0
            vals = [_pad_cols(v, p, fill, left=True) for v in vals]
        elif vals[0].dim() == 2:
            fill = pad_id if f.name == "response" else 0
            vals = [_pad_cols(v, t, fill, left=False) for v in vals]
        out[f.name] = torch.cat(vals, dim=0)
    return Experience(**out)
