"""Reward sources: a trained reward model, or a Python function users write themselves.

A source is called with the rollout's ``Sequences`` and the actor's tokenizer and returns the raw
score R_final of each response, (B,) float32. New sources (a server, an RM with another tokenizer,
several combined) plug into the rollout here."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rlhfkit.config import ConfigError
from rlhfkit.rollout.forward import reward_scores

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function. It gets decoded prompts and responses and
    returns one float per response."""
    if ":" not in spec:
        raise ConfigError(f"reward_fn: {spec!r} is not of the form 'module:function'")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn: cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"reward_fn: {spec!r} is not callable")
    return fn


class RMReward:
    """A reward model that shares the actor's tokenizer: token ids passed straight through, the
    score read at the last real token (``rollout.forward.reward_scores``)."""

    def __init__(self, rm):
        self.module = rm  # a PerTokenScalar over the frozen RM

    def __call__(self, seq, tokenizer) -> torch.Tensor:
        return reward_scores(self.module, seq)


class FnReward:
    """A Python reward ``fn(prompts, responses) -> scores`` on the decoded texts."""

    module = None

    def __init__(self, fn: RewardFn):
        self.fn = fn

    def __call__(self, seq, tokenizer) -> torch.Tensor:
        return call_reward_fn(self.fn, *decode_sequences(tokenizer, seq))


def decode_sequences(tokenizer, seq) -> tuple[list[str], list[str]]:
    """Decoded prompts and responses of a rollout's ``Sequences``."""
    p = seq.prompt_width
    return decode_texts(
        tokenizer, seq.input_ids[:, :p], seq.attention_mask[:, :p], seq.response, seq.response_mask
    )


def call_reward_fn(fn: RewardFn, prompts: list[str], responses: list[str]) -> torch.Tensor:
    scores = torch.as_tensor(fn(prompts, responses), dtype=torch.float32)
    if scores.shape != (len(responses),):
        raise ValueError(
            f"reward function returned shape {tuple(scores.shape)}, expected ({len(responses)},)"
        )
    return scores


def decode_texts(
    tokenizer, prompt_ids, prompt_mask, response, response_mask
) -> tuple[list[str], list[str]]:
    """Decoded prompts and responses (special tokens and padding dropped), one string per row."""
    prompts = [
        tokenizer.decode(p[m.bool()], skip_special_tokens=True)
        for p, m in zip(prompt_ids, prompt_mask, strict=True)
    ]
    responses = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(response, response_mask, strict=True)
    ]
    return prompts, responses
