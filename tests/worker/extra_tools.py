"""Tools that only the tests register, as a deployment would write its own (AGENTRUN_TOOL_MODULES)."""

import asyncio

from worker.tools import ToolContext, tool


@tool
def shout(text: str) -> str:
    """Returns the text in capitals."""
    return text.upper()


@tool
async def nap(seconds: float) -> str:
    """Sleeps, to stand for a slow tool."""
    await asyncio.sleep(seconds)
    return f"slept {seconds} s"


@tool
def idempotency_key(context: ToolContext) -> str:
    """Returns the idempotency key the tool was given."""
    return context.idempotency_key


@tool
def pad(text: str, size: int) -> str:
    """Returns the text followed by filler up to ``size`` characters, to stand for a tool with a large result."""
    return text + "x" * max(0, size - len(text))
