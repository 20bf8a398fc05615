"""An MCP tool server on the ``mcp`` SDK (``MCPServer``), for the tests: started on stdio as a
command (``python tests/mcp_server.py``) or served over Streamable HTTP (``app()``)."""

import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@server.tool()
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


@server.tool()
def wait(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "awake"


def app():
    return server.streamable_http_app()


if __name__ == "__main__":
    server.run("stdio")
