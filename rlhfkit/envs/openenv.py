"""OpenEnv environments, run unmodified (``openenv-core``, the ``envs`` extra).

An OpenEnv environment takes Pydantic actions and returns Pydantic observations that carry
``reward`` and ``done``. Two ways in:

    env: my_module:MyEnvironment     a subclass of ``openenv.core.env_server.Environment``,
                                     one instance per episode, in this process
    env.url: http://127.0.0.1:8000   a server started by OpenEnv's own ``create_app``; each
                                     episode opens its own session over its WebSocket
                                     protocol (``GenericEnvClient(...).sync()``)

An ``MCPEnvironment`` (OpenEnv's environments whose tools are served over MCP) is run as a tool
environment instead: its MCP tools are the model's tools (``MCPToolsEpisode``). Otherwise, text
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
    """One episode of an OpenEnv ``MCPEnvironment`` instance: its MCP tools are the model's tools
    (``ListToolsAction`` once at start-up for the schemas, a ``CallToolAction`` per call, run
    through ``ToolEnv``: argument check, timeout, error messages and counts as for any tool); a
    turn without a call is the final answer. A call's observation reward and done count."""

    def __init__(self, env, schemas: list[dict], parser: str, timeout: float):
        from rlhfkit.envs.tools import ToolEnv

        self.env, self.reward, self.done = env, 0.0, False
        callers = [self._caller(t["function"]["name"]) for t in schemas]
        self._tools = ToolEnv(callers, schemas, parser, timeout)
        self.tools, self.counts = self._tools.tools, self._tools.counts

    def _caller(self, name: str):
        def call(**arguments: Any) -> str:
            from openenv.core.env_server.mcp_types import CallToolAction

            obs = self.env.step(CallToolAction(tool_name=name, arguments=arguments))
            self.reward += obs.reward or 0.0
            self.done = self.done or bool(obs.done)
            if obs.error is not None:
                raise RuntimeError(f"{obs.error.error_type.value}: {obs.error.message}")
            content = getattr(obs.result, "content", None) or []
            return "\n".join(c.text for c in content if getattr(c, "text", None) is not None)

        call.__name__ = call.__qualname__ = name
        return call

    def reset(self, row: dict[str, Any]):
        fields = self.env.reset(**accepted(self.env.reset, row)).model_dump()
        return with_prompt_suffix(row["prompt"], observation_text(fields) if _shown(fields) else "")

    def step(self, text: str):
        self.reward = 0.0
        obs, _, done = self._tools.step(text)
        return (None if self.done else obs), self.reward, done or self.done

    def close(self) -> None:
        self.env.close()


def _shown(fields: dict[str, Any]) -> bool:
    return any(k not in _READ for k in fields)


def mcp_tool_schemas(cls: type, spec: str) -> list[dict]:
    """The MCP tools of an ``MCPEnvironment`` class, from a first instance, in the chat
    templates' format."""
    from openenv.core.env_server.mcp_types import ListToolsAction

    env = cls()
    try:
        listed = env.step(ListToolsAction()).tools
    finally:
        env.close()
    if not listed:
        raise ConfigError(f"env.factory ({spec}): the MCP environment lists no tools")
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description,
                                          "parameters": t.input_schema}}
        for t in listed
    ]  # fmt: skip


def local_factory(cls: type, spec: str, parser: str, timeout: float):
    """Our factory for an ``Environment`` class (``ENV_ADAPTERS``): an ``MCPEnvironment``'s MCP
    tools become the model's tools; any other's action class is the annotation of ``step``'s
    action, whose text field is found once, at start-up."""
    if is_mcp_env(cls):
        schemas = mcp_tool_schemas(cls, spec)
        return lambda: MCPToolsEpisode(cls(), schemas, parser, timeout)
    hints = typing.get_type_hints(cls.step)
    action_cls = hints.get("action")
    if action_cls is None:
        raise ConfigError(f"env.factory ({spec}): {cls.__name__}.step has no annotated action")
    field = text_field(action_cls.model_json_schema(), f"env.factory ({spec})")
    return lambda: OpenEnvEpisode(_Local(cls(), action_cls, field), spec)


def remote_factory(url: str, timeout: float):
    """Our factory for an OpenEnv server at ``url``: its action schema read once from
    ``/schema`` (a server that does not answer is a config error naming the URL)."""
    import requests

    from rlhfkit.extras import require

    require("envs", "env.url (an OpenEnv server)")
    try:
        r = requests.get(f"{url.rstrip('/')}/schema", timeout=10)
        r.raise_for_status()
        schema = r.json()["action"]
    except Exception as e:
        raise ConfigError(f"env.url: no OpenEnv server answers at {url} ({e})") from None
    field = text_field(schema, f"env.url ({url})")
    return lambda: OpenEnvEpisode(_Remote(url, field, timeout), url)
