"""Environments: what the model talks to over several turns (tools, games, checkers).

The interface is OpenEnv's, with text actions (docs/decisions.md): one instance per episode,
made by a factory (``env.factory: module:factory``, called with no arguments), and

    reset(row)          -> the start of the episode: a string (the user's message) or a list of
                           chat messages. ``row`` is the prompts-file row: ``prompt`` and every
                           other field (a gold answer, a task id), as reward functions get them.
    step(text)          -> (observation, reward, done): the environment's answer to the model's
                           turn ``text`` (decoded, special tokens dropped). ``observation``: a
                           string (sent as a user turn), a message dict or a list of them (a tool
                           turn: ``{"role": "tool", ...}``), or None when done. ``reward``: a
                           float or None (= 0); the episode's rewards are summed.

An OpenEnv-style result object is accepted from ``step`` too: one with ``.observation``,
``.reward`` and ``.done`` (a client's ``StepResult``) or an observation with ``.reward`` and
``.done`` on itself; its observation must still be text or chat messages.

An env may carry ``tools``: JSON schemas passed to the chat template with the first prompt
(``apply_chat_template(tools=...)``), as ``ToolEnv`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from rlhfkit.config import load_callable
from rlhfkit.envs.tools import TOOL_PARSERS, ToolEnv, load_tools, parser_for, tool_schemas
from rlhfkit.envs.trl import TRLEnv, is_trl_env, trl_factory
from rlhfkit.rewards.env import env_reward  # the documented spec rlhfkit.envs:env_reward

Messages = list[dict[str, Any]]
Observation = str | dict | Messages | None


class Env(Protocol):
    def reset(self, row: dict[str, Any]) -> str | Messages: ...

    def step(self, text: str) -> tuple[Observation, float | None, bool]: ...


class EnvError(RuntimeError):
    """An environment raised, timed out, or answered something that is not a step."""


def as_step(result: Any, where: str) -> tuple[Messages | None, float, bool]:
    """A ``step`` result -> (observation as chat messages or None, reward, done). Accepts our
    ``(observation, reward, done)`` tuple and OpenEnv's result objects. A non-finite reward is
    passed on as it is (the run's non-finite guard handles it); a bad type is an ``EnvError``."""
    if isinstance(result, tuple) and len(result) == 3:
        obs, reward, done = result
    elif hasattr(result, "done") and hasattr(result, "reward"):
        obs = getattr(result, "observation", result)
        obs = None if obs is result and result.done else obs
        reward, done = result.reward, result.done
    else:
        raise EnvError(
            f"{where}: step returned {type(result).__name__}, expected (observation, reward, done)"
        )
    if reward is not None and not isinstance(reward, (int, float)):
        raise EnvError(f"{where}: step returned a reward of type {type(reward).__name__}")
    return as_messages(obs, where), (0.0 if reward is None else float(reward)), bool(done)


def as_messages(obs: Any, where: str, role: str = "user") -> Messages | None:
    """An observation -> chat messages: a string is one ``role`` message; a dict, one message; a
    list, several. Anything else (a number, an OpenEnv object) is an ``EnvError``."""
    if obs is None:
        return None
    if isinstance(obs, str):
        return [{"role": role, "content": obs}]
    msgs = [obs] if isinstance(obs, dict) else obs
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs
    ):
        raise EnvError(
            f"{where}: the observation must be a string or chat messages "
            f"({{'role', 'content': str}}), got {type(obs).__name__}: {str(obs)[:80]!r}"
        )
    return list(msgs)


# environments written for other libraries, each a (test, wrap) pair: a config's ``env.factory``
# that passes the test is wrapped into our factory as wrap(obj, spec, parser, tool_timeout)
ENV_ADAPTERS: list[tuple[Callable[[Any], bool], Callable]] = [(is_trl_env, trl_factory)]


def make_factory(spec_factory: str, tools: list[str], parser: str, tool_timeout: float):
    """The config's environment factory: ``env.factory`` imported (through ``ENV_ADAPTERS`` when
    it is another library's kind), or a ``ToolEnv`` over ``env.tools``. ``parser``: the tool-call
    format (``parser_for`` resolves auto). Returns (factory, the name used in errors)."""
    if spec_factory:
        obj = load_callable(spec_factory, "env.factory")
        for matches, wrap in ENV_ADAPTERS:
            if matches(obj):
                return wrap(obj, spec_factory, parser, tool_timeout), spec_factory
        return obj, spec_factory
    fns = load_tools(tools)
    schemas = tool_schemas(fns)
    name = f"ToolEnv({', '.join(tools)})"

    def factory() -> ToolEnv:
        return ToolEnv(fns, schemas=schemas, parser=parser, timeout=tool_timeout)

    return factory, name


EnvFactory = Callable[[], Env]

__all__ = [
    "TOOL_PARSERS",
    "Env",
    "EnvError",
    "ENV_ADAPTERS",
    "EnvFactory",
    "TRLEnv",
    "ToolEnv",
    "as_messages",
    "as_step",
    "env_reward",
    "load_tools",
    "make_factory",
    "parser_for",
    "tool_schemas",
]
