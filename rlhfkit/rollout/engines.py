"""Rollout engines: what turns left-padded prompt ids into sampled response ids (``rollout.engine``).

An engine is called as ``sampling.generate`` is, ``engine(model, prompt_ids, prompt_mask,
**sample) -> Generation``, so that the single-turn sampler and the multi-turn episodes run on any
of them. An engine with its own copy of the weights (vLLM) loads the trainer's in ``sync(model)``,
which the samplers call once before each rollout (all of an episode's turns sample from one
version); the ``hf`` engine samples from the model itself.

``exact_logprobs``: whether the logprobs it returns equal the trainer's own forward to fp32
rounding. The ``hf`` engine's do (the sampler's logits are the policy's), so the rollout can skip
the actor's scoring forward; another engine's are kept as the sampler's logprobs for
``ppo.rollout_correction`` and log pi_old is recomputed.

    ENGINES = {"hf": the KV-cache decode loop of rollout/sampling.py,
               "vllm": rollout/vllm_engine.py, in the trainer's process or behind a server}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhfkit.rollout.sampling import generate


class HFEngine:
    """rlhfkit's own sampler (``rollout/sampling.generate``) over the trainer's model."""

    exact_logprobs = True

    def sync(self, model) -> None:
        """Nothing to load: it samples from the trainer's model itself."""

    def __call__(self, model, prompt_ids, prompt_mask, **sample):
        return generate(model, prompt_ids, prompt_mask, **sample)

    def close(self) -> None:
        pass


def _vllm(rollout, model_cfg, tokenizer) -> Any:
    from rlhfkit.rollout.vllm_engine import vllm_engine  # imports vLLM: only when chosen

    return vllm_engine(rollout, model_cfg, tokenizer)


# rollout.engine -> a builder (rollout config, model config, tokenizer) -> engine
ENGINES: dict[str, Callable[..., Any]] = {
    "hf": lambda rollout, model_cfg, tokenizer: HFEngine(),
    "vllm": _vllm,
}


def build_engine(rollout, model_cfg, tokenizer):
    """The engine of ``rollout.engine`` for the policy of ``model_cfg``."""
    return ENGINES[rollout.engine](rollout, model_cfg, tokenizer)
