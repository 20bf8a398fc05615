"""TRL-style environment classes, run unmodified (``env: my_module:MyEnv``).

TRL's ``GRPOTrainer(environment_factory=MyEnv)`` takes a class with a no-argument constructor
and ``reset(**row) -> str | None``; every other public method is a tool, described to the model
by its type hints and docstring. This adapter makes one instance per episode and plays it as
our protocol: the row's prompt (with the text ``reset`` returns appended to its last user turn),
then the model's calls to the instance's methods, answered as a ``ToolEnv`` answers (errors the
model reads, counted), until a turn calls none. Reward functions read the instances through the
``environments`` column (``fn(prompts, responses, environments, ...)``), as TRL's do.
"""

from __future__ import annotations

import inspect
from typing import Any

from rlhfkit.envs.protocol import with_prompt_suffix
from rlhfkit.envs.tools import ToolEnv, tool_schemas


def is_trl_env(obj: Any) -> bool:
    """A class with ``reset`` and no ``step``: TRL's environment shape (ours have ``step``)."""
    return inspect.isclass(obj) and hasattr(obj, "reset") and not hasattr(obj, "step")


def tool_methods(instance: Any) -> list:
    """The instance's tools: its public methods other than ``reset``, defined by its class."""
    names = [
        n
        for n, f in inspect.getmembers(type(instance), inspect.isfunction)
        if not n.startswith("_") and n != "reset"
    ]
    return [getattr(instance, n) for n in names]


class TRLEnv:
    """One episode of a TRL-style environment instance."""

    def __init__(self, instance: Any, schemas: list[dict], parser: str, timeout: float):
        self.instance = instance  # what reward functions get in the ``environments`` column
        self._tools = ToolEnv(tool_methods(instance), schemas, parser, timeout)
        self.tools, self.counts = self._tools.tools, self._tools.counts

    def reset(self, row: dict[str, Any]):
        extra = self.instance.reset(**accepted(self.instance.reset, row))
        return with_prompt_suffix(row["prompt"], extra or "")

    def step(self, text: str):
        return self._tools.step(text)


def accepted(fn, row: dict[str, Any]) -> dict[str, Any]:
    """The row's fields ``fn`` takes: all of them with ``**kwargs``, else the ones it names
    (TRL's examples write both ``reset(self, **kwargs)`` and ``reset(self)``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(row)
    return {k: v for k, v in row.items() if k in {p.name for p in params}}


def trl_factory(cls: type, spec: str, parser: str, timeout: float):
    """Our environment factory for TRL's class ``cls`` (named ``spec`` in errors). The tools'
    schemas are built once, from a first instance, so that a method without type hints or a
    docstring is a config error naming it before any work."""
    schemas = tool_schemas(tool_methods(cls()), key=f"env.factory ({spec})")

    def factory() -> TRLEnv:
        return TRLEnv(cls(), schemas, parser, timeout)

    return factory
