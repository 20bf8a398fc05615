"""MCP tool servers as the model's tools (``env.mcp: [url or command, ...]``, the ``envs``
extra).

Each server is connected once per run (Streamable HTTP for a URL, stdio for a command, both
through the ``mcp`` SDK's ``Client``) and kept open on an event-loop thread of its own. Its
tools join ``env.tools``: their JSON schemas come from MCP (``inputSchema``), and each call runs
through ``ToolEnv`` like a Python tool's, with the same per-call timeout, argument check,
error messages and counts. A tool's own error, or a server that died, is an error message for
the model (naming the server), counted in ``env/tool_errors``; a server that cannot be reached
at start-up is a config error naming it, before any work.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

from rlhfkit.config import ConfigError


class MCPServerTools:
    """One MCP server's tools, as callables ``fn(**arguments) -> str`` and their schemas."""

    def __init__(self, target: str, timeout: float, key: str):
        from mcp import StdioServerParameters

        self.target, self.timeout = target, timeout
        if target.startswith(("http://", "https://")):
            server: Any = target
        else:
            command, *args = shlex.split(target)
            server = StdioServerParameters(command=command, args=args)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="rlhfkit-mcp").start()
        ready = threading.Event()
        held = asyncio.run_coroutine_threadsafe(self._hold(server, ready), self.loop)
        deadline = time.monotonic() + 60
        while not ready.wait(0.05) and not held.done() and time.monotonic() < deadline:
            pass  # connected, failed, or out of time
        if not ready.is_set():
            error = held.exception() if held.done() else TimeoutError("no answer within 60 s")
            held.cancel()
            raise ConfigError(f"{key}: cannot connect to the MCP server {target} ({error})")
        self.listed = self._run(self.client.list_tools()).tools

    async def _hold(self, server, ready: threading.Event) -> None:
        """The connection, open for as long as the run: anyio's scopes must be left by the task
        that entered them, so one task holds the client and the calls are other tasks."""
        from mcp import Client

        self._stop = asyncio.Event()
        async with Client(server) as client:
            self.client = client
            ready.set()
            await self._stop.wait()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout + 5)

    def schemas(self) -> list[dict]:
        """Each tool in the chat templates' format: {"type": "function", "function": {...}}."""
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema,
                },
            }
            for t in self.listed
        ]

    def tools(self) -> list[Callable[..., str]]:
        return [self._caller(t.name) for t in self.listed]

    def _caller(self, name: str) -> Callable[..., str]:
        def call(**arguments: Any) -> str:
            try:
                result = self._run(self.client.call_tool(name, arguments))
            except Exception as e:  # the server died, or the connection broke
                raise RuntimeError(f"the MCP server {self.target}: {type(e).__name__}: {e}") from e
            text = "\n".join(c.text for c in result.content if getattr(c, "text", None) is not None)
            if result.is_error:
                raise RuntimeError(f"the MCP server {self.target} answered an error: {text}")
            return text

        call.__name__ = call.__qualname__ = name
        return call
