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
from typing import Any

from rlhfkit.config import load_callable
from rlhfkit.envs.openenv import is_openenv_env, local_factory, remote_factory
from rlhfkit.envs.protocol import Env, EnvError, Messages, Observation, as_messages, as_step
from rlhfkit.envs.tools import TOOL_PARSERS, ToolEnv, load_tools, parser_for, tool_schemas
from rlhfkit.envs.trl import TRLEnv, is_trl_env, trl_factory
from rlhfkit.rewards.env import env_reward  # the documented spec rlhfkit.envs:env_reward

# environments written for other libraries, each a (test, wrap) pair: a config's ``env.factory``
# that passes the test is wrapped into our factory as wrap(obj, spec, parser, tool_timeout)
ENV_ADAPTERS: list[tuple[Callable[[Any], bool], Callable]] = [
    (is_trl_env, trl_factory),
    (is_openenv_env, local_factory),
]


def mcp_server(target: str, timeout: float, key: str):
    """An MCP server's tools (``rlhfkit.envs.mcp``), after checking the extra is installed."""
    from rlhfkit.envs.mcp import MCPServerTools
    from rlhfkit.extras import require

    require("envs", key)
    return MCPServerTools(target, timeout, key)


def make_factory(env_cfg, parser: str):
    """The config's environment factory (``env`` section): ``env.factory`` imported (through
    ``ENV_ADAPTERS`` when it is another library's kind), an OpenEnv server at ``env.url``, or a
    ``ToolEnv`` over ``env.tools`` and the tools of the MCP servers of ``env.mcp``. ``parser``: the tool-call format (``parser_for`` resolves
    auto). Returns (factory, the name used in errors)."""
    if env_cfg.url:
        return (
            remote_factory(env_cfg.url, parser, env_cfg.timeout, env_cfg.tool_timeout),
            env_cfg.url,
        )
    if env_cfg.factory:
        obj = load_callable(env_cfg.factory, "env.factory")
        for matches, wrap in ENV_ADAPTERS:
            if matches(obj):
                return wrap(obj, env_cfg.factory, parser, env_cfg.tool_timeout), env_cfg.factory
        return obj, env_cfg.factory
    fns = load_tools(env_cfg.tools)
    schemas = tool_schemas(fns)
    for i, target in enumerate(env_cfg.mcp):  # MCP servers' tools join the Python ones
        server = mcp_server(target, env_cfg.tool_timeout, f"env.mcp[{i}]")
        fns, schemas = fns + server.tools(), schemas + server.schemas()
    name = f"ToolEnv({', '.join([*env_cfg.tools, *env_cfg.mcp])})"
    timeout = env_cfg.tool_timeout

    def factory() -> ToolEnv:
        return ToolEnv(fns, schemas=schemas, parser=parser, timeout=timeout)

    return factory, name


EnvFactory = Callable[[], Env]

__all__ = [
    "TOOL_PARSERS",
    "Env",
    "Messages",
    "Observation",
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
