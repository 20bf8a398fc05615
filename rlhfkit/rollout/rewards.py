"""Reward sources: a trained reward model, or a Python function users write themselves.

A source is called with the rollout's ``Sequences`` and the actor's tokenizer and returns the raw
score R_final of each response, (B,) float32. New sources (a server, an RM with another tokenizer,
several combined) plug into the rollout here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.algos import RunningMeanStd, clip_abs
from rlhfkit.config import load_callable
from rlhfkit.rewards.env import env_reward
from rlhfkit.rollout.columns import Columns, columns_for, required_columns, sendable
from rlhfkit.rollout.forward import reward_scores
from rlhfkit.train import dist

# fn(prompts, responses, **columns) -> one score per response; columns optional (rollout.columns)
RewardFn = Callable[..., list[float]]


class RewardFunctionError(RuntimeError):
    """A Python reward function raised, or returned something that is not one score per response."""


class ScoreNormalizer:
    """R_final -> (R - mean) / std with the RM's stored reference statistics or running ones, then clip."""

    def __init__(self, mode: str, rm_stats: dict[str, float] | None, clip: float):
        self.mode = "running" if (mode == "rm_stats" and rm_stats is None) else mode
        self.rm_stats, self.clip, self.running = rm_stats, clip, RunningMeanStd()

    def __call__(self, raw: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (B,) bool: the rows whose scores may enter the running statistics (an
        episode dropped by ``env.on_error: skip`` has no real score)."""
        if self.mode == "none":
            x = raw
        elif self.mode == "rm_stats":
            x = (raw - self.rm_stats["mean"]) / max(self.rm_stats["std"], 1e-8)
        else:
            # moments over all ranks, so every rank keeps the same running statistics; a
            # non-finite score (a bad reward) goes to the guard, never into the statistics
            r = raw.detach().double()
            r = r[torch.isfinite(r) & (True if keep is None else keep.to(r.device))]
            n = dist.all_reduce_sum(torch.tensor(float(r.numel()), dtype=torch.float64))
            mean = dist.all_reduce_sum(r.sum()) / n
            var = dist.all_reduce_sum(((r - mean) ** 2).sum()) / n
            self.running.update_from_moments(float(mean), float(var), float(n))
            x = self.running.normalize(raw)
        return clip_abs(x, self.clip or None)


def load_reward_fn(spec: str, key: str = "reward_fn") -> RewardFn:
    """'package.module:function' -> the function. It gets decoded prompts and responses and
    returns one float per response. ``key``: the config key that named it, for the error."""
    return load_callable(spec, key)


class RMReward:
    """A reward model that shares the actor's tokenizer: token ids passed straight through, the
    score read at the last real token (``rollout.forward.reward_scores``)."""

    def __init__(self, rm):
        self.module = rm  # a PerTokenScalar over the frozen RM

    def __call__(self, seq, tokenizer, columns: Columns | None = None) -> torch.Tensor:
        return reward_scores(self.module, seq)

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {}


class FnReward:
    """A Python reward ``fn(prompts, responses, **columns) -> scores`` on the decoded texts.
    ``key``: the config key that named it (for a missing column's error)."""

    module = None

    def __init__(self, fn: RewardFn, key: str = "reward_fn"):
        self.fn, self.key = fn, key

    def __call__(self, seq, tokenizer, columns: Columns | None = None) -> torch.Tensor:
        return call_reward_fn(self.fn, *decode_sequences(tokenizer, seq), columns)

    def needs(self) -> dict[str, tuple[str, ...]]:
        cols = required_columns(self.fn)
        return {self.key: cols} if cols else {}

    def pop_metrics(self) -> dict[str, float]:
        """What the function counted since the last call (a checker's ``reward/unparsed``)."""
        return getattr(self.fn, "pop_metrics", dict)()


class TextRMReward:
    """An RM with its own tokenizer: the responses decoded (special tokens dropped) and scored as
    text in the RM's own training format (``rewards.text_rm.TextRM``)."""

    def __init__(self, rm):
        self.rm = rm
        self.module = None  # not sharded with the actor's frozen models: its own layout

    def __call__(self, seq, tokenizer, columns: Columns | None = None) -> torch.Tensor:
        return self.rm.score(*decode_sequences(tokenizer, seq))

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {}


class HttpReward:
    """A reward server (``rewards.http``): the decoded texts POSTed, one score per response back."""

    module = None

    def __init__(self, client):
        self.client = client

    def __call__(self, seq, tokenizer, columns: Columns | None = None) -> torch.Tensor:
        return torch.tensor(
            self.client.score(*decode_sequences(tokenizer, seq), sendable(columns)),
            dtype=torch.float32,
        )

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {}


class CombinedReward:
    """sum_i weight_i x normalise_i(score_i) over named sources. Each source's raw mean is kept
    for the iteration's metrics (``score/<name>``, read by ``pop_metrics``)."""

    module = None

    def __init__(self, parts: list[tuple[str, float, object, ScoreNormalizer]]):
        self.parts = parts
        self._sums: dict[str, float] = {}
        self._n = 0

    def __call__(self, seq, tokenizer, columns: Columns | None = None) -> torch.Tensor:
        total = None
        for name, weight, source, normalize in self.parts:
            raw = source(seq, tokenizer, columns).float().cpu()  # (B,)
            self._sums[name] = self._sums.get(name, 0.0) + float(raw.sum())
            part = weight * normalize(raw)
            total = part if total is None else total + part
        self._n += len(total)
        return total

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {k: v for _, _, source, _ in self.parts for k, v in source.needs().items()}

    def names(self) -> list[str]:
        return [f"score/{name}" for name, *_ in self.parts]

    def pop_metrics(self) -> dict[str, float]:
        out = {f"score/{k}": v / max(self._n, 1) for k, v in self._sums.items()}
        self._sums, self._n = {}, 0
        for _, _, source, _ in self.parts:  # what each source counted itself
            out.update(getattr(source, "pop_metrics", dict)())
        return out


def decode_sequences(tokenizer, seq) -> tuple[list[str], list[str]]:
    """Decoded prompts and responses of a rollout's ``Sequences``."""
    p = seq.prompt_width
    return decode_texts(
        tokenizer, seq.input_ids[:, :p], seq.attention_mask[:, :p], seq.response, seq.response_mask
    )


def call_reward_fn(
    fn: RewardFn, prompts: list[str], responses: list[str], columns: Columns | None = None
) -> torch.Tensor:
    """``fn``'s scores as a (B,) float32 tensor; an exception names the function and the batch.
    ``columns``: the rows' other fields, passed as keyword arguments to a function that takes
    them (``rollout.columns``); a two-argument function gets none."""
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    where = (
        f"a batch of {len(responses)} responses (first prompt {prompts[0][:60]!r})"
        if prompts
        else "an empty batch"
    )
    try:
        scores = torch.as_tensor(
            fn(prompts, responses, **columns_for(fn, columns)), dtype=torch.float32
        )
    except Exception as e:
        raise RewardFunctionError(f"reward function {name} raised on {where}: {e!r}") from e
    if scores.shape != (len(responses),):
        raise RewardFunctionError(
            f"reward function {name} returned shape {tuple(scores.shape)} on {where}, "
            f"expected ({len(responses)},)"
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


# --------------------------------------------------------------------------- building sources


def model_reward(path: str, model_cfg, tokenizer, key: str = "reward_model"):
    """An RM directory as a reward source: token ids straight through when its tokenizer is the
    actor's (the fast path), else scored as text with its own tokenizer and template. ``key``:
    the config key that named it, for the error on a bad path."""
    from rlhfkit.models import PerTokenScalar, check_source, load_scalar_model
    from rlhfkit.rewards.text_rm import TextRM

    check_source(path, key)

    if rm_shares_tokenizer(path, tokenizer):
        rm = load_scalar_model(model_cfg, tokenizer, path, fresh_head=False, trainable=False)
        return RMReward(PerTokenScalar(rm))
    return TextRMReward(TextRM(path, device=model_cfg.device, dtype=model_cfg.dtype))


def rm_shares_tokenizer(path: str, tokenizer) -> bool:
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rewards.text_rm import same_tokenizer

    return same_tokenizer(load_tokenizer(ModelConfig(name_or_path=str(path))), tokenizer)


def url_reward(url: str, cfg) -> HttpReward:
    from rlhfkit.rewards.http import RewardClient

    return HttpReward(
        RewardClient(
            url,
            batch_size=cfg.reward_batch_size,
            timeout=cfg.reward_timeout,
            retries=cfg.reward_retries,
            concurrency=cfg.reward_concurrency,
            token_env=cfg.reward_token_env,
        )
    )


def build_reward(cfg, model_cfg, tokenizer, reward_fn: RewardFn | None = None):
    """The rollout's reward source from a PPO config: ``rewards:`` (several, combined), or one of
    ``reward_model``, ``reward_url``, ``reward_fn`` (or a function passed in). ``model_cfg``: how
    to load a frozen RM (dtype, device; no LoRA)."""
    from rlhfkit.models import read_reward_stats

    if cfg.rewards:
        parts = []
        for i, r in enumerate(cfg.rewards):
            if r.model:
                source = model_reward(r.model, model_cfg, tokenizer, f"rewards[{i}].model")
            elif r.url:
                source = url_reward(r.url, cfg)
            else:
                source = FnReward(load_reward_fn(r.fn, f"rewards[{i}].fn"), f"rewards[{i}].fn")
            stats = read_reward_stats(r.model) if r.normalize == "rm_stats" else None
            parts.append((r.name, r.weight, source, ScoreNormalizer(r.normalize, stats, 0.0)))
        return CombinedReward(parts)
    if cfg.reward_model:
        return model_reward(cfg.reward_model, model_cfg, tokenizer)
    if cfg.reward_url:
        return url_reward(cfg.reward_url, cfg)
    if not (reward_fn or cfg.reward_fn) and cfg.env.enabled:  # the environment's own rewards
        return FnReward(env_reward, "env")
    return FnReward(reward_fn or load_reward_fn(cfg.reward_fn))
