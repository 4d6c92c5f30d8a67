"""A real MCP server for the tests, written with the mcp SDK's server side.

``python -m tests.worker.mcp_servers stdio`` serves it over stdio; ``... http PORT`` over streamable HTTP at
``http://127.0.0.1:PORT/mcp``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("agentrun-tests", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the given reason."""
    raise ToolError(reason)


@server.tool()
def secret() -> str:
    """Tells a secret; agents filter it out."""
    return "the secret"


@server.tool()
def environment(name: str) -> str:
    """The value of an environment variable in the server's process."""
    return os.environ.get(name, "(unset)")


@server.tool()
def authorization(ctx: Context) -> str:
    """The Authorization header of the request."""
    return (ctx.headers or {}).get("authorization", "(none)")


@server.tool()
def idempotency_key(ctx: Context) -> str:
    """The idempotency key the call carries in its _meta."""
    return str((ctx.request_context.meta or {}).get("agentrun/idempotency-key"))


def multiply(a: int, b: int) -> int:
    """Multiplies two integers."""
    return a * b


@server.tool()
def grow() -> str:
    """Adds the tool 'multiply' to the server, as a server's deploy would."""
    server.add_tool(multiply)
    return "multiply added"


def add_three(a: int, b: int, c: int = 0) -> int:
    """Adds two or three integers."""
    return a + b + c


@server.tool()
def reshape() -> str:
    """Gives the tool 'add' a third argument, as a server's deploy would."""
    server.remove_tool("add")
    server.add_tool(add_three, name="add")
    return "add reshaped"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleeps, to stand for a slow tool."""
    await anyio.sleep(seconds)
    return f"slept {seconds} s"


@server.tool()
def crash_once(marker: str) -> str:
    """Kills the server's process the first time (when the marker file does not exist yet)."""
    if not Path(marker).exists():
        Path(marker).write_text("crashed")
        os._exit(1)
    return "recovered"


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
