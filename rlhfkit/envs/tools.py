"""A tool environment from plain Python functions (``env.tools: [module:fn, ...]``).

Each function's JSON schema comes from its type hints and docstring (transformers'
``get_json_schema``); the chat template renders the schemas in the first prompt
(``apply_chat_template(tools=...)``). The model calls tools in its own family's format; a
parser (``TOOL_PARSERS``, ``env.tool_parser``) reads the calls out of its turn. A turn without
a call is the final answer: the episode ends and the reward sources score it.

A call that cannot run (malformed JSON, a tool name the model made up, arguments that do not
match the tool's JSON schema: a missing, unknown or wrong-typed one), a tool that raises, one
past its timeout, and a result JSON cannot encode (a set, a datetime) all give the model an error
message as the tool's answer and are counted (``env/invalid_calls``, ``env/tool_errors``); none
of them stops the run. The calls of one turn run concurrently, and the turn waits at most
``timeout`` seconds for all of them together (one deadline: six 10 s calls take 10 s, and a
turn never outlasts the episode loop's ``env.timeout`` because of its tool calls).

Adding a format: write ``parse(text) -> list[call]``, where a call is ``{"name", "arguments"}``
or an ``InvalidCall(reason)``, and register it in ``TOOL_PARSERS``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from rlhfkit.config import ConfigError, load_callable

# tool calls run here, so that a timeout can give up on one; a call past its timeout keeps its
# thread until it returns (Python cannot kill a thread): a tool that never returns leaks one
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rlhfkit-tool")


@dataclass(frozen=True)
class InvalidCall:
    reason: str


# a block's body never holds another <tool_call>: an unclosed block followed by a closed one is
# two blocks, the first invalid, not one block with the second inside it
_HERMES = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)


def _not_json(e: json.JSONDecodeError, text: str) -> InvalidCall:
    return InvalidCall(f"the tool call is not valid JSON ({e.msg}): {text[:80]!r}")


def _call_from(obj: Any, args_key: str, text: str) -> dict | InvalidCall:
    """One decoded JSON call ``{"name": str, args_key: {...}}`` -> a call, or why it is not."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return InvalidCall(f'a tool call needs {{"name": str, ...}}: {text[:80]!r}')
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args)
    if not isinstance(args, dict):
        return InvalidCall(f"the arguments of {obj['name']!r} are not an object")
    return {"name": obj["name"], "arguments": args}


def parse_hermes(text: str) -> list[dict | InvalidCall]:
    """Hermes / Qwen 2.5-3 format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    one block per call. An opened block that never closes is an invalid call."""
    calls: list[dict | InvalidCall] = []
    for body in _HERMES.findall(text):
        try:
            calls.append(_call_from(json.loads(body), "arguments", body))
        except json.JSONDecodeError as e:
            calls.append(_not_json(e, body))
    if text.count("<tool_call>") > len(_HERMES.findall(text)):
        calls.append(InvalidCall("a <tool_call> block is not closed with </tool_call>"))
    return calls


def parse_llama3(text: str) -> list[dict | InvalidCall]:
    """Llama 3.1-3.3 JSON tool calls: the turn is one JSON object ``{"name": ...,
    "parameters": {...}}`` (after an optional ``<|python_tag|>``), or several separated by
    ``;``. A turn that does not start with ``{`` is an answer, not a call."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return []
    calls: list[dict | InvalidCall] = []
    decoder, i = json.JSONDecoder(), 0
    while i < len(body):
        try:
            obj, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError as e:
            calls.append(_not_json(e, body[i:]))
            break
        calls.append(_call_from(obj, "parameters", body[i:end]))
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return calls


def parse_mistral(text: str) -> list[dict | InvalidCall]:
    """Mistral's format: ``[TOOL_CALLS]`` followed by a JSON list of ``{"name", "arguments"}``
    (v3 tokenizers), or by ``name[ARGS]{...}`` once per call (v11 and later)."""
    if "[TOOL_CALLS]" not in text:
        return []
    calls: list[dict | InvalidCall] = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        part = part.strip()
        if "[ARGS]" in part:  # name[ARGS]{...}
            name, _, args = part.partition("[ARGS]")
            try:
                obj = {
                    "name": name.strip(),
                    "arguments": json.JSONDecoder().raw_decode(args.strip())[0],
                }
            except json.JSONDecodeError as e:
                calls.append(_not_json(e, part))
                continue
            calls.append(_call_from(obj, "arguments", part))
            continue
        try:
            obj = json.JSONDecoder().raw_decode(part)[0]
        except json.JSONDecodeError as e:
            calls.append(_not_json(e, part))
            continue
        for one in obj if isinstance(obj, list) else [obj]:
            calls.append(_call_from(one, "arguments", json.dumps(one)))
    return calls


TOOL_PARSERS: dict[str, Callable[[str], list[dict | InvalidCall]]] = {
    "hermes": parse_hermes,
    "llama3": parse_llama3,
    "mistral": parse_mistral,
}

# what a chat template writes for a call, in the order they are looked for: its parser
_TEMPLATE_MARKS = (
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "hermes"),
    ('"parameters"', "llama3"),
)


def parser_for(chat_template: str | None, choice: str = "auto") -> str:
    """``env.tool_parser``: as given, or with ``auto`` the format the chat template writes its
    calls in (Mistral's ``[TOOL_CALLS]``, Hermes/Qwen's ``<tool_call>``, Llama 3's
    ``"parameters"`` JSON), else hermes."""
    if choice != "auto":
        return choice
    for mark, name in _TEMPLATE_MARKS:
        if chat_template and mark in chat_template:
            return name
    return "hermes"


def load_tools(specs: list[str]) -> list[Callable]:
    """``['module:fn', ...]`` -> the functions (config key ``env.tools``)."""
    return [load_callable(s, f"env.tools[{i}]") for i, s in enumerate(specs)]


def tool_schemas(fns: list[Callable], key: str = "env.tools") -> list[dict]:
    """The JSON schemas of ``fns`` (functions or bound methods) from their type hints and
    docstrings (``get_json_schema``); one it cannot describe is a config error naming it."""
    from transformers.utils import get_json_schema

    out = []
    for fn in fns:
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # TypeHintParsingException, DocstringParsingException
            raise ConfigError(
                f"{key}: cannot build the JSON schema of {fn.__module__}:{fn.__qualname__} "
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
        self.params = {
            t["function"]["name"]: t["function"].get("parameters", {}) for t in self.tools
        }
        self.parse, self.timeout = TOOL_PARSERS[parser], timeout
        self.counts = {"tool_calls": 0, "tool_errors": 0, "invalid_calls": 0}
        self.answered = 0  # tool messages so far (their ids)

    def reset(self, row: dict[str, Any]):
        return row["prompt"]

    def step(self, text: str):
        calls = self.parse(text)
        if not calls:
            return None, None, True  # the final answer
        answers = _with_ids(self._answer_all(calls), self.answered)
        self.answered += len(answers)
        return answers, None, False

    def _answer_all(self, calls: list[dict | InvalidCall]) -> list[dict[str, str]]:
        """The tool messages answering a turn's calls, in order. Valid calls run concurrently
        under one deadline of ``timeout`` seconds for the whole turn."""
        out: list[dict[str, str] | None] = [self._reject(c) for c in calls]
        futures = {
            i: _POOL.submit(self.fns[c["name"]], **c["arguments"])
            for i, c in enumerate(calls)
            if out[i] is None
        }
        self.counts["tool_calls"] += len(futures)
        deadline = time.monotonic() + self.timeout
        for i, future in futures.items():
            name = calls[i]["name"]
            try:
                result = future.result(timeout=max(deadline - time.monotonic(), 0.0))
                out[i] = _tool_message(name, _encode(result))
            except FutureTimeout:
                self.counts["tool_errors"] += 1
                out[i] = _tool_message(name, f"error: {name} timed out after {self.timeout:g} s")
            except Exception as e:  # the tool's own exception, or a result JSON cannot encode
                self.counts["tool_errors"] += 1
                out[i] = _tool_message(name, f"error: {name} {_failure(e)}")
        return out  # type: ignore[return-value]

    def _reject(self, call: dict | InvalidCall) -> dict[str, str] | None:
        """The error message for a call that cannot run (counted), or None for a valid one."""
        name = call.get("name", "?") if isinstance(call, dict) else "?"
        if isinstance(call, InvalidCall):
            reason = call.reason
        elif name not in self.fns:
            reason = f"there is no tool {name!r}; the tools are {sorted(self.fns)}"
        else:
            reason = _argument_error(name, call["arguments"], self.params.get(name, {}))
            if reason is None:
                return None
        self.counts["invalid_calls"] += 1
        return _tool_message(name, f"error: {reason}")


class _Unencodable(TypeError):
    """A tool returned something JSON cannot encode."""


def _encode(result: Any) -> str:
    """A tool's result as the text the model reads: a string as it is, anything else as JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as e:
        raise _Unencodable(
            f"returned a {type(result).__name__} that JSON cannot encode ({e})"
        ) from None


def _failure(e: Exception) -> str:
    return str(e) if isinstance(e, _Unencodable) else f"raised {type(e).__name__}: {e}"


def _argument_error(name: str, args: dict, schema: dict) -> str | None:
    """Why ``args`` do not match the tool's JSON schema (``jsonschema``; unknown arguments
    included, which Python would reject too), or None. ``add("2", "3")`` would return "23"."""
    import jsonschema

    schema = {**schema, "additionalProperties": schema.get("additionalProperties", False)}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(args), key=str)
    if not errors:
        return None
    e = errors[0]
    where = "/".join(str(p) for p in e.absolute_path) or "arguments"
    return f"the arguments of {name!r} do not match its schema: {where}: {e.message}"


def _tool_message(name: str, content: str) -> dict[str, str]:
    return {"role": "tool", "name": name, "content": content}


def _with_ids(messages: list[dict[str, str]], first: int) -> list[dict[str, str]]:
    """Tool messages with ``tool_call_id``s, numbered through the episode as 9 digits (the id
    Mistral's templates require; the others ignore it)."""
    return [{**m, "tool_call_id": f"{first + i:09d}"} for i, m in enumerate(messages)]
