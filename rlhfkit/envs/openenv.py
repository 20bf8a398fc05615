"""OpenEnv environments, run unmodified (``openenv-core``, the ``envs`` extra).

An OpenEnv environment takes Pydantic actions and returns Pydantic observations that carry
``reward`` and ``done``. Two ways in:

    env: my_module:MyEnvironment     a subclass of ``openenv.core.env_server.Environment``,
                                     one instance per episode, in this process
    env.url: http://127.0.0.1:8000   a server started by OpenEnv's own ``create_app``; each
                                     episode opens its own session over its WebSocket
                                     protocol (``GenericEnvClient(...).sync()``)

An ``MCPEnvironment`` (OpenEnv's environments whose tools are served over MCP), in process or
served (its action is then ``CallToolAction``, read from ``/schema``; sessions through
``MCPToolClient(...).sync()``), is run as a tool environment instead: its MCP tools are the
model's tools (``MCPToolsEpisode``). Otherwise, text
actions and observations map to turns: the model's turn fills the action's one text field
(its schema's only required string), and an observation is shown as its one text field, or as
JSON of its fields when it has several (``reward``, ``done`` and ``metadata`` are read, not
shown). ``reset(**row)`` gets the row's fields it names; its observation's text is appended to
the prompt's last user turn. A server that is down is a config error naming the URL; one that
times out or answers what is not an observation is an ``EnvError`` naming it.
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Any

from rlhfkit.config import ConfigError
from rlhfkit.envs.protocol import EnvError, with_prompt_suffix
from rlhfkit.envs.trl import accepted

_READ = ("reward", "done", "metadata")  # what an observation carries that is not shown


def is_openenv_env(obj: Any) -> bool:
    """A subclass of OpenEnv's ``Environment`` (found by its MRO: no import of openenv here)."""
    return inspect.isclass(obj) and any(
        c.__name__ == "Environment" and c.__module__.startswith("openenv.") for c in obj.__mro__
    )


def text_field(schema: dict, where: str) -> str:
    """The action's field that carries the model's text: its only required string field."""
    props, required = schema.get("properties", {}), schema.get("required", [])
    text = [k for k in required if props.get(k, {}).get("type") == "string"]
    if len(text) != 1:
        raise ConfigError(
            f"{where}: the action {schema.get('title', '?')!r} needs exactly one required string "
            f"field to carry the model's text; it has {sorted(required) or 'none'}"
        )
    return text[0]


def observation_text(fields: dict[str, Any]) -> str:
    """An observation's shown part: its one text field, else its fields as JSON."""
    shown = {k: v for k, v in fields.items() if k not in _READ}
    if len(shown) == 1 and isinstance(next(iter(shown.values())), str):
        return next(iter(shown.values()))
    return json.dumps(shown)


class OpenEnvEpisode:
    """One episode of an OpenEnv session as our protocol. ``session``: ``reset(**kw)`` and
    ``step(text)`` returning (observation fields, reward, done), in process or remote."""

    def __init__(self, session, name: str):
        self.session, self.name = session, name

    def reset(self, row: dict[str, Any]):
        fields, _, _ = self.session.reset(row)
        return with_prompt_suffix(row["prompt"], observation_text(fields))

    def step(self, text: str):
        fields, reward, done = self.session.step(text)
        return (None if done else observation_text(fields)), reward, done

    def close(self) -> None:
        self.session.close()


class _Local:
    """An ``Environment`` instance: actions built from its ``step``'s annotated action class."""

    def __init__(self, env, action_cls, field: str):
        self.env, self.action_cls, self.field = env, action_cls, field

    def reset(self, row):
        return _split(self.env.reset(**accepted(self.env.reset, row)).model_dump())

    def step(self, text):
        return _split(self.env.step(self.action_cls(**{self.field: text})).model_dump())

    def close(self) -> None:
        self.env.close()


class _Remote:
    """A session with an OpenEnv server (``GenericEnvClient(url).sync()``)."""

    def __init__(self, url: str, field: str, timeout: float):
        from openenv.core import GenericEnvClient

        self.url, self.field = url, field
        self.client = GenericEnvClient(base_url=url, message_timeout_s=timeout).sync()

    def reset(self, row):
        return self._result(self.client.reset(), "reset")

    def step(self, text):
        return self._result(self.client.step({self.field: text}), "step")

    def _result(self, r, what: str):
        if not isinstance(getattr(r, "observation", None), dict):
            raise EnvError(f"env.url {self.url}: {what} answered {r!r}, not an observation")
        return r.observation, r.reward, bool(r.done)

    def close(self) -> None:
        self.client.close()


def _split(fields: dict[str, Any]):
    return fields, fields.get("reward"), bool(fields.get("done"))


def is_mcp_env(cls: type) -> bool:
    """An OpenEnv ``MCPEnvironment``: its tools are reached through MCP actions."""
    return any(c.__name__ == "MCPEnvironment" for c in cls.__mro__)


class MCPToolsEpisode:
    """One episode of an OpenEnv ``MCPEnvironment``: its MCP tools are the model's tools (listed
    once at start-up for the schemas, a ``CallToolAction`` per call, run through ``ToolEnv``:
    argument check, timeout, error messages and counts as for any tool); a turn without a call is
    the final answer. A call's observation reward and done count. ``session``: ``reset(row) ->
    fields``, ``call(name, arguments) -> observation``, ``close()``, in process or remote."""

    def __init__(self, session, schemas: list[dict], parser: str, timeout: float):
        from rlhfkit.envs.tools import ToolEnv

        self.session, self.reward, self.done = session, 0.0, False
        callers = [self._caller(t["function"]["name"]) for t in schemas]
        self._tools = ToolEnv(callers, schemas, parser, timeout)
        self.tools, self.counts = self._tools.tools, self._tools.counts

    def _caller(self, name: str):
        def call(**arguments: Any) -> str:
            obs = self.session.call(name, arguments)
            self.reward += obs.reward or 0.0
            self.done = self.done or bool(obs.done)
            if obs.error is not None:
                raise RuntimeError(f"{obs.error.error_type.value}: {obs.error.message}")
            return result_text(obs.result)

        call.__name__ = call.__qualname__ = name
        return call

    def reset(self, row: dict[str, Any]):
        fields = self.session.reset(row)
        return with_prompt_suffix(row["prompt"], observation_text(fields) if _shown(fields) else "")

    def step(self, text: str):
        self.reward = 0.0
        obs, _, done = self._tools.step(text)
        return (None if self.done else obs), self.reward, done or self.done

    def close(self) -> None:
        self.session.close()


def result_text(result: Any) -> str:
    """An MCP tool result's text: its text contents joined, read from the result object (in
    process) or from its JSON (over the wire)."""
    content = (
        result.get("content") if isinstance(result, dict) else getattr(result, "content", None)
    )
    texts = [
        c.get("text") if isinstance(c, dict) else getattr(c, "text", None) for c in content or []
    ]
    return "\n".join(t for t in texts if t is not None)


class _LocalMCP:
    """An ``MCPEnvironment`` instance in this process."""

    def __init__(self, env):
        self.env = env

    def reset(self, row):
        return self.env.reset(**accepted(self.env.reset, row)).model_dump()

    def call(self, name: str, arguments: dict):
        from openenv.core.env_server.mcp_types import CallToolAction

        return self.env.step(CallToolAction(tool_name=name, arguments=arguments))

    def close(self) -> None:
        self.env.close()


class _RemoteMCP:
    """A session with a served ``MCPEnvironment`` (``MCPToolClient(url).sync()``, its WebSocket
    protocol). One message at a time on the socket: a turn's concurrent calls take turns."""

    def __init__(self, url: str, timeout: float):
        import threading

        from openenv.core.mcp_client import MCPToolClient

        self.url, self.lock = url, threading.Lock()
        self.client = MCPToolClient(base_url=url, message_timeout_s=timeout).sync()

    def reset(self, row):
        with self.lock:
            r = self.client.reset()
        if not hasattr(r.observation, "model_dump"):
            raise EnvError(f"env.url {self.url}: reset answered {r!r}, not an observation")
        return r.observation.model_dump()

    def call(self, name: str, arguments: dict):
        from openenv.core.env_server.mcp_types import CallToolAction, CallToolObservation

        with self.lock:
            r = self.client.step(CallToolAction(tool_name=name, arguments=arguments))
        if not isinstance(r.observation, CallToolObservation):
            raise RuntimeError(f"the OpenEnv server {self.url} answered {r!r}, not a tool result")
        # the server sends a call's reward and done beside its observation, not inside it
        return r.observation.model_copy(update={"reward": r.reward, "done": bool(r.done)})

    def close(self) -> None:
        self.client.close()


def _shown(fields: dict[str, Any]) -> bool:
    return any(k not in _READ for k in fields)


def mcp_tool_schemas(listed: list, where: str) -> list[dict]:
    """MCP tools (``ListToolsAction``'s answer) in the chat templates' format."""
    if not listed:
        raise ConfigError(f"{where}: the MCP environment lists no tools")
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description,
                                          "parameters": t.input_schema}}
        for t in listed
    ]  # fmt: skip


def _listed_in_process(cls: type) -> list:
    from openenv.core.env_server.mcp_types import ListToolsAction

    env = cls()  # a first instance, for the schemas only
    try:
        return env.step(ListToolsAction()).tools
    finally:
        env.close()


def local_factory(cls: type, spec: str, parser: str, timeout: float):
    """Our factory for an ``Environment`` class (``ENV_ADAPTERS``): an ``MCPEnvironment``'s MCP
    tools become the model's tools; any other's action class is the annotation of ``step``'s
    action, whose text field is found once, at start-up."""
    if is_mcp_env(cls):
        schemas = mcp_tool_schemas(_listed_in_process(cls), f"env.factory ({spec})")
        return lambda: MCPToolsEpisode(_LocalMCP(cls()), schemas, parser, timeout)
    hints = typing.get_type_hints(cls.step)
    action_cls = hints.get("action")
    if action_cls is None:
        raise ConfigError(f"env.factory ({spec}): {cls.__name__}.step has no annotated action")
    field = text_field(action_cls.model_json_schema(), f"env.factory ({spec})")
    return lambda: OpenEnvEpisode(_Local(cls(), action_cls, field), spec)


def is_mcp_action(schema: dict) -> bool:
    """A served ``MCPEnvironment``'s action: OpenEnv's ``CallToolAction``."""
    props = schema.get("properties", {})
    return props.get("type", {}).get("const") == "call_tool" and "tool_name" in props


def remote_factory(url: str, parser: str, timeout: float, tool_timeout: float):
    """Our factory for an OpenEnv server at ``url``: its action schema read once from
    ``/schema`` (a server that does not answer is a config error naming the URL). A served
    ``MCPEnvironment`` (its action is ``CallToolAction``) is a tool environment: its tools listed
    once over MCP; any other's action text field is found once."""
    import requests

    from rlhfkit.extras import require

    require("envs", "env.url (an OpenEnv server)")
    try:
        r = requests.get(f"{url.rstrip('/')}/schema", timeout=10)
        r.raise_for_status()
        schema = r.json()["action"]
    except Exception as e:
        raise ConfigError(f"env.url: no OpenEnv server answers at {url} ({e})") from None
    if is_mcp_action(schema):
        first = _RemoteMCP(url, timeout)
        try:
            listed = first.client.list_tools()
        finally:
            first.close()
        schemas = mcp_tool_schemas(listed, f"env.url ({url})")
        return lambda: MCPToolsEpisode(_RemoteMCP(url, timeout), schemas, parser, tool_timeout)
    field = text_field(schema, f"env.url ({url})")
    return lambda: OpenEnvEpisode(_Remote(url, field, timeout), url)
