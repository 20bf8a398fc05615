"""The per-token forward passes over prompt + response, with the logit/label alignment in one place.

Layout: ``input_ids = [left-padded prompt (P) | right-padded response (T)]``. The response token
a_t sits at column P + t and is predicted by the output at column P + t - 1, which is also the
state s_t the critic values. So both read the T columns P-1 .. P+T-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.algos import last_index, logprobs_and_entropy, position_ids, token_logprobs
from rlhfkit.models.packing import packable, packed_attention


@dataclass
class Sequences:
    input_ids: torch.Tensor  # (B, P+T)
    attention_mask: torch.Tensor  # (B, P+T)
    position_ids: torch.Tensor  # (B, P+T)
    prompt_width: int  # P
    response: torch.Tensor  # (B, T) a_t
    response_mask: torch.Tensor  # (B, T) bool
    # the policy's forwards may pack the rows into one (``models.packing``; fp32 only, where the
    # layout changes logprobs by rounding alone: ``rollout.collect.fixed_layout``)
    packed: bool = False


def join(prompt_ids, prompt_mask, response, response_mask, packed: bool = False) -> Sequences:
    ids = torch.cat([prompt_ids, response], dim=1)
    attn = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return Sequences(
        ids, attn, position_ids(attn), prompt_ids.shape[1], response, response_mask.bool(), packed
    )


def _logprobs(logits, tokens, temperature: float, with_entropy: bool):
    # the logits are this forward's own temporary: their memory takes their gradient (consume)
    if with_entropy:
        return logprobs_and_entropy(logits, tokens, temperature, consume=True)
    return token_logprobs(logits, tokens, temperature, consume=True), None  # no entropy work


def state_indices(seq: Sequences) -> torch.Tensor:
    """The T column indices P-1 .. P+T-2 of the states s_t, for ``logits_to_keep``."""
    p, t = seq.prompt_width, seq.response.shape[1]
    return torch.arange(p - 1, p - 1 + t, device=seq.input_ids.device)


def policy_logprobs(model, seq: Sequences, temperature: float, with_entropy: bool = False):
    """log pi(a_t|s_t) (B, T) and, if asked, the entropy (B, T). Logits only for response positions.

    ``logits_to_keep`` as the state columns' indices (HF models take a tensor there) gives
    contiguous (B, T, V) logits: with ``logits_to_keep=T+1`` and a ``[:, :-1]`` slice, the
    log-softmax copied the whole slice in forward and autograd wrote a zero-filled (B, T+1, V)
    gradient in backward, ~1 GB each at 16 x 256 positions of a 49k vocabulary (issue 24).

    With ``seq.packed`` and a ``packable`` model the forward runs on the real tokens alone
    (``packed_logprobs``); positions after a response's end then hold 0 (as the sampler's do)."""
    if runs_packed(model, seq):
        return packed_logprobs(model, seq, temperature, with_entropy)
    logits = model(
        input_ids=seq.input_ids,
        attention_mask=seq.attention_mask,
        position_ids=seq.position_ids,
        use_cache=False,
        logits_to_keep=state_indices(seq),
    ).logits  # (B, T, V)
    return _logprobs(logits, seq.response, temperature, with_entropy)


# the packed forward gathers each layer's queries, keys and values into rows and back: 2-3% of
# a tiny model's step with no padding to remove (benchmarks/grpo_step.py --with-padded, Zen 1
# EPYC, session 19), so a batch with less padding than this runs padded
PACK_MIN_PADDING = 1 / 32


def padding_share(seq: Sequences) -> float:
    """The share of padding cells in the batch's (B, P+T) layout."""
    return 1.0 - float(seq.attention_mask.sum()) / seq.attention_mask.numel()


def runs_packed(model, seq: Sequences) -> bool:
    """Whether ``model``'s forward over ``seq`` runs on one packed row (``models.packing``)."""
    return seq.packed and padding_share(seq) >= PACK_MIN_PADDING and packable(model)


def _packed_forward(model, seq: Sequences, **kw):
    """``model`` called on the real tokens of ``seq`` as one packed row (1, N), positions from 0
    in each row, attention within each row; ``kw``: the call's other keyword arguments."""
    real = seq.attention_mask.bool()
    with packed_attention(model, real.sum(1)):
        return model(input_ids=seq.input_ids[real][None], position_ids=seq.position_ids[real][None],
                     **kw)  # fmt: skip


def packed_logprobs(model, seq: Sequences, temperature: float, with_entropy: bool = False):
    """``policy_logprobs`` on one packed row: the real tokens of every row end to end, each row's
    positions from 0, attention within each row (``models.packing``), logits only for the real
    response tokens' states. (B, T) outputs, 0 where ``response_mask`` is False."""
    real = seq.attention_mask.bool()
    t, p = seq.response.shape[1], seq.prompt_width
    index = real.flatten().cumsum(0).view(real.shape) - 1  # packed index of each real cell
    state_real = real[:, p - 1 : p - 1 + t][seq.response_mask]
    if not bool(state_real.all()):  # a state of a response token is padding: not one sequence
        raise ValueError("packed forward: a response token follows a padding column in its row")
    states = index[:, p - 1 : p - 1 + t][seq.response_mask]  # (n,) row-major
    logits = _packed_forward(model, seq, use_cache=False, logits_to_keep=states).logits  # (1, n, V)
    logp, ent = _logprobs(logits, seq.response[seq.response_mask][None], temperature, with_entropy)

    def unpack(x):  # (1, n) -> (B, T), zeros after each response's end
        return torch.zeros_like(seq.response, dtype=x.dtype).masked_scatter(seq.response_mask, x)

    return unpack(logp), None if ent is None else unpack(ent)


def _state_columns(per_position: torch.Tensor, seq: Sequences) -> torch.Tensor:
    """(B, P+T) -> (B, T): the columns of the states s_t, P-1 .. P+T-2."""
    t = seq.response.shape[1]
    return per_position[:, seq.prompt_width - 1 : seq.prompt_width - 1 + t]


def _per_position(scalar, seq: Sequences) -> torch.Tensor:
    """A ``PerTokenScalar``'s (B, P+T) outputs; with ``seq.packed`` (as ``policy_logprobs``) from
    one packed row, 0 at the padding."""
    if not runs_packed(scalar, seq):
        return scalar(seq.input_ids, seq.attention_mask, seq.position_ids)
    v = _packed_forward(scalar, seq, attention_mask=None)  # (1, N)
    real = seq.attention_mask.bool()
    return torch.zeros(real.shape, dtype=v.dtype, device=v.device).masked_scatter(real, v[0])


def critic_values(critic, seq: Sequences) -> torch.Tensor:
    """V(s_t) for each response position, (B, T) float32 (0 at padding columns when packed).
    ``critic``: a ``PerTokenScalar`` (or DDP of one)."""
    return _state_columns(_per_position(critic, seq), seq)


def actor_critic_outputs(ac, seq: Sequences, temperature: float, with_entropy: bool = False):
    """Shared trunk: log pi(a_t|s_t), entropy (or None) and V(s_t), each (B, T), from one forward.
    ``ac``: a ``models.ActorCritic`` (or DDP of one)."""
    cols = state_indices(seq)
    logits, v = ac(seq.input_ids, seq.attention_mask, seq.position_ids, logits_to_keep=cols)
    logp, ent = _logprobs(logits, seq.response, temperature, with_entropy)
    return logp, ent, _state_columns(v, seq)


def reward_scores(rm, seq: Sequences) -> torch.Tensor:
    """R_final: the RM's score read at the last real token of prompt + response. (B,)
    ``rm``: a ``PerTokenScalar``."""
    r = _per_position(rm, seq)  # (B, P+T)
    return r[torch.arange(r.shape[0], device=r.device), last_index(seq.attention_mask)]
