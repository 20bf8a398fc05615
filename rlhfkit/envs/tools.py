"""A tool environment from plain Python functions (``env.tools: [module:fn, ...]``).

Each function's JSON schema comes from its type hints and docstring (transformers'
``get_json_schema``); the chat template renders the schemas in the first prompt
(``apply_chat_template(tools=...)``). The model calls tools in its own family's format; a
parser (``TOOL_PARSERS``, ``env.tool_parser``) reads the calls out of its turn. A turn without
a call is the final answer: the episode ends and the reward sources score it.

A call that cannot run (malformed JSON, a tool name the model made up, wrong arguments), a tool
that raises, and one past its timeout all give the model an error message as the tool's answer
and are counted (``env/invalid_calls``, ``env/tool_errors``); none of them stops the run.

Adding a format: write ``parse(text) -> list[call]``, where a call is ``{"name", "arguments"}``
or an ``InvalidCall(reason)``, and register it in ``TOOL_PARSERS``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

# tool calls run here, so that a timeout can give up on one; a call past its timeout keeps its
# thread until it returns (Python cannot kill a thread): a tool that never returns leaks one
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rlhfkit-tool")


@dataclass(frozen=True)
class InvalidCall:
    reason: str


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> list[dict | InvalidCall]:
    """Hermes / Qwen 2.5-3 format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    one block per call. An opened block that never closes is an invalid call."""
    calls: list[dict | InvalidCall] = []
    for body in _HERMES.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(InvalidCall(f"the tool call is not valid JSON ({e.msg}): {body[:80]!r}"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(InvalidCall(f'a tool call needs {{"name": str, ...}}: {body[:80]!r}'))
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        if not isinstance(args, dict):
            calls.append(InvalidCall(f"the arguments of {call['name']!r} are not an object"))
            continue
        calls.append({"name": call["name"], "arguments": args})
    if text.count("<tool_call>") > len(_HERMES.findall(text)):
        calls.append(InvalidCall("a <tool_call> block is not closed with </tool_call>"))
    return calls


TOOL_PARSERS: dict[str, Callable[[str], list[dict | InvalidCall]]] = {"hermes": parse_hermes}


def load_tools(specs: list[str]) -> list[Callable]:
    """``['module:fn', ...]`` -> the functions (config key ``env.tools``)."""
    from rlhfkit.rollout.rewards import load_reward_fn

    return [load_reward_fn(s, f"env.tools[{i}]") for i, s in enumerate(specs)]


def tool_schemas(fns: list[Callable]) -> list[dict]:
    """The JSON schemas of ``fns`` from their type hints and docstrings (``get_json_schema``);
    a function it cannot describe is a config error naming it."""
    from transformers.utils import get_json_schema

    from rlhfkit.config import ConfigError

    out = []
    for fn in fns:
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # TypeHintParsingException, DocstringParsingException
            raise ConfigError(
                f"env.tools: cannot build the JSON schema of {fn.__module__}:{fn.__name__} "
                f"(type hints and a Google-style docstring with Args: are needed): {e}"
            ) from None
    return out


class ToolEnv:
    """One episode with tools: the row's prompt, then tool answers until a turn calls none.

    ``counts``: what happened in this episode (read by the rollout for the metrics)."""

    def __init__(
        self,
        fns: list[Callable],
        schemas: list[dict] | None = None,
        parser: str = "hermes",
        timeout: float = 10.0,
    ):
        self.fns = {fn.__name__: fn for fn in fns}
        self.tools = schemas if schemas is not None else tool_schemas(fns)
        self.parse, self.timeout = TOOL_PARSERS[parser], timeout
        self.counts = {"tool_calls": 0, "tool_errors": 0, "invalid_calls": 0}

    def reset(self, row: dict[str, Any]):
        return row["prompt"]

    def step(self, text: str):
        calls = self.parse(text)
        if not calls:
            return None, None, True  # the final answer
        return [self._answer(c) for c in calls], None, False

    def _answer(self, call: dict | InvalidCall) -> dict[str, str]:
        """The tool message answering one call: its result, or an error the model can read."""
        name = call.get("name", "?") if isinstance(call, dict) else "?"
        if isinstance(call, InvalidCall):
            self.counts["invalid_calls"] += 1
            return _tool_message(name, f"error: {call.reason}")
        fn = self.fns.get(name)
        if fn is None:
            self.counts["invalid_calls"] += 1
            return _tool_message(
                name, f"error: there is no tool {name!r}; the tools are {sorted(self.fns)}"
            )
        self.counts["tool_calls"] += 1
        future = _POOL.submit(fn, **call["arguments"])
        try:
            result = future.result(timeout=self.timeout)
        except FutureTimeout:
            self.counts["tool_errors"] += 1
            return _tool_message(name, f"error: {name} timed out after {self.timeout:g} s")
        except Exception as e:  # the tool's own exception, or wrong arguments (TypeError)
            self.counts["tool_errors"] += 1
            return _tool_message(name, f"error: {name} raised {type(e).__name__}: {e}")
        return _tool_message(name, result if isinstance(result, str) else json.dumps(result))


def _tool_message(name: str, content: str) -> dict[str, str]:
    return {"role": "tool", "name": name, "content": content}
