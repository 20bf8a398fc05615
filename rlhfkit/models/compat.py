"""The few transformers APIs that changed name within 5.x, in one place, so that the user's
output shows no deprecation warnings on the current release and older 5.x releases still work:
the KV-cache argument (``past_key_values`` -> ``cache``, deprecated in 5.2x) and activation
checkpointing (``gradient_checkpointing_enable`` -> ``activation_checkpointing_enable``)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


def _base(model):
    """The HF model under a peft wrapper (whose forward takes ``*args, **kwargs``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@lru_cache(maxsize=64)
def _cache_arg(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model``'s forward."""
    return {_cache_arg(type(_base(model))): cache}


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` on current releases)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def enable_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), by whichever name this release has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """peft (0.18) asks the model ``is_gradient_checkpointing``, which transformers 5.2x
    deprecated for ``is_activation_checkpointing``: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield
