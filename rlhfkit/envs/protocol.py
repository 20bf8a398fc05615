"""Our environment protocol (docs in ``rlhfkit.envs``): what ``step`` may return and how it is
read, and the error an environment's failure becomes. Below the adapters, which use it."""

from __future__ import annotations

from typing import Any, Protocol

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


def with_prompt_suffix(prompt, text: str):
    """``prompt`` (a string or chat messages) with ``text`` appended to its last user turn,
    after a blank line: how an adapter shows what another library's ``reset`` returned."""
    if not text:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt}\n\n{text}"
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    turn = {**prompt[last], "content": f"{prompt[last]['content']}\n\n{text}"}
    return [*prompt[:last], turn, *prompt[last + 1 :]]
