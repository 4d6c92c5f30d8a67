"""Tools from MCP servers, through the official ``mcp`` SDK: discovered when the worker starts, refreshed
periodically, called over one pooled session per server.

Each server's tools go into the worker's ToolRegistry as ``mcp_<server>_<tool>``, so they are offered, validated,
approved, snapshotted and run exactly as Python tools are: a call is one ``run_tool`` activity.

Sessions: one per server and worker process, opened at the start and shared by every call (a stdio server is one
process, not one per call). A session whose server died or dropped the connection is discarded, and the next call
opens a new one. Nothing here retries a call: a call that could not reach its server raises ToolUnavailableError,
the activity fails, and Temporal's retry policy is the only retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import httpx2
from mcp import Client
from mcp.client import Transport
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CONNECTION_CLOSED,
    REQUEST_TIMEOUT,
    CallToolResult,
    EmbeddedResource,
    Implementation,
    PaginatedRequestParams,
    RequestParamsMeta,
    TextContent,
    TextResourceContents,
)

from shared.agents import AgentConfig, McpServerConfig, resolve_env
from worker.tools import Tool, ToolContext, ToolError, ToolRegistry, ToolUnavailableError, mcp_tool_name

log = logging.getLogger("agentrun.worker.mcp")

# The `_meta` key of a call that carries its idempotency key (the same on every retry of one call), so a server
# with side effects can recognise a retry of work it has already done.
IDEMPOTENCY_KEY_META = "agentrun/idempotency-key"
# A tools/list that pages on forever cannot stall the worker.
_MAX_LIST_PAGES = 100


class McpServerError(ConnectionError):
    """An MCP server that the agents use cannot be reached, or its settings cannot be resolved."""


class _Session:
    """The worker's session with one server, opened on first use and again after it broke.

    The SDK's transports live in anyio task groups, which must be left by the task that entered them; so each
    session has a task of its own that holds it open until it is closed.
    """

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self._client: Client | None = None
        self._holder: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._opening = asyncio.Lock()

    async def client(self) -> Client:
        """The open session, or a new one; ToolUnavailableError naming the server when it cannot be opened."""
        async with self._opening:
            if self._client is None or self._holder is None or self._holder.done():
                await self._open()
            assert self._client is not None
            return self._client

    async def _open(self) -> None:
        await self.close()
        config = self.config
        try:
            # Resolved at each connect, so a rotated secret is used from the next session on.
            env = {key: resolve_env(value, f"env.{key}") for key, value in config.env.items()}
            headers = {key: resolve_env(value, f"headers.{key}") for key, value in config.headers.items()}
            if config.bearer_token_env:
                token = resolve_env(f"${{{config.bearer_token_env}}}", "bearer_token_env")
                headers["Authorization"] = f"Bearer {token}"
        except ValueError as err:
            raise McpServerError(f"MCP server {config.name!r}: {err}") from None
        ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        stop = self._stop = asyncio.Event()

        async def hold() -> None:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    server: StdioServerParameters | Transport
                    if config.command:
                        # The process gets the SDK's small default environment (PATH, HOME ...) and ``env``,
                        # not the worker's secrets.
                        server = StdioServerParameters(
                            command=config.command, args=list(config.args), env=env or None, cwd=config.cwd
                        )
                    else:
                        # httpx makes no retries of its own; a call's answer may stream for as long as it may take.
                        timeout = httpx2.Timeout(config.call_timeout_seconds, connect=config.connect_timeout_seconds)
                        http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=timeout))
                        server = streamable_http_client(config.url, http_client=http)
                    client = await stack.enter_async_context(
                        Client(
                            server,
                            # Each request's limit; a call sets its own.
                            read_timeout_seconds=config.connect_timeout_seconds,
                            # A refresh must see the tools as the server lists them now, not as a cache recalls them.
                            cache=None,
                            client_info=Implementation(name="agentrun-worker", version="0.1.0"),
                        )
                    )
                    ready.set_result(client)
                    await stop.wait()
            except asyncio.CancelledError:
                raise
            except BaseException as err:
                if not ready.done():
                    ready.set_exception(err)
                else:
                    log.warning("MCP server %r: the session ended: %s", config.name, _reason(err))

        holder = asyncio.create_task(hold(), name=f"mcp-session-{config.name}")
        try:
            async with asyncio.timeout(config.connect_timeout_seconds):
                client = await asyncio.shield(ready)
        except TimeoutError:
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
            raise ToolUnavailableError(
                f"MCP server {config.name!r} ({config.describe()}) did not connect within "
                f"{config.connect_timeout_seconds:g} s"
            ) from None
        except Exception as err:
            await asyncio.gather(holder, return_exceptions=True)
            raise ToolUnavailableError(
                f"MCP server {config.name!r} ({config.describe()}) cannot be reached: {_reason(err)}"
            ) from None
        self._client, self._holder = client, holder

    async def discard(self, client: Client) -> None:
        """Drops ``client`` if it is still the session: its connection broke, and the next use opens another."""
        if client is self._client:
            await self.close()

    async def close(self) -> None:
        holder, self._client, self._holder = self._holder, None, None
        self._stop.set()
        if holder is not None:
            await asyncio.gather(holder, return_exceptions=True)


class McpServers:
    """The MCP servers the worker's agents use: their sessions, and their tools in ``registry``."""

    def __init__(self, configs: Iterable[McpServerConfig], registry: ToolRegistry) -> None:
        self._sessions = {config.name: _Session(config) for config in configs}
        self._registry = registry
        self._refreshing: list[asyncio.Task[None]] = []
        self._listed: dict[str, list[Tool]] = {}

    @classmethod
    def used_by(
        cls, agents: Iterable[AgentConfig], configs: Mapping[str, McpServerConfig], registry: ToolRegistry
    ) -> McpServers:
        """The servers that at least one of ``agents`` uses (the others are not started)."""
        used = {use.server for agent in agents for use in agent.mcp_servers}
        return cls([configs[name] for name in sorted(used)], registry)

    async def __aenter__(self) -> McpServers:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connects to every server and lists its tools; McpServerError naming each server that failed and why."""
        results = await asyncio.gather(*(self.refresh(name) for name in self._sessions), return_exceptions=True)
        failed = [str(result) for result in results if isinstance(result, BaseException)]
        if failed:
            await self.close()
            raise McpServerError("; ".join(failed))
        for session in self._sessions.values():
            if session.config.refresh_seconds:
                self._refreshing.append(asyncio.create_task(self._refresh_every(session.config)))

    async def close(self) -> None:
        for task in self._refreshing:
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        self._refreshing.clear()
        await asyncio.gather(*(session.close() for session in self._sessions.values()))

    async def refresh(self, server: str) -> None:
        """Lists the server's tools again and makes them the ones the registry offers for it; on failure the
        registry keeps what it had (a server that is down for a moment does not take its tools from new runs)."""
        session = self._sessions[server]
        try:
            client = await session.client()
        except ToolUnavailableError as err:
            raise McpServerError(str(err)) from None
        try:
            listed = []
            cursor = None
            for _ in range(_MAX_LIST_PAGES):
                page = await client.session.list_tools(params=PaginatedRequestParams(cursor=cursor))
                listed += page.tools
                cursor = page.next_cursor
                if cursor is None:
                    break
        except Exception as err:
            await session.discard(client)
            raise McpServerError(f"MCP server {server!r} could not list its tools: {_reason(err)}") from None
        tools = []
        for listed_tool in listed:
            try:
                tools.append(
                    Tool(
                        name=mcp_tool_name(server, listed_tool.name),
                        description=listed_tool.description or listed_tool.title or listed_tool.name,
                        parameters=dict(listed_tool.input_schema),
                        fn=self._caller(server, listed_tool.name),
                    )
                )
            except ValueError as err:
                log.warning("MCP server %r: tool %r is left out: %s", server, listed_tool.name, err)
        if {t.name: t.digest() for t in tools} != {t.name: t.digest() for t in self._listed.get(server, [])}:
            log.info("MCP server %r offers %s", server, ", ".join(t.name for t in tools) or "no tools")
        try:
            self._registry.set_mcp_tools(server, tools)
        except ValueError as err:
            raise McpServerError(str(err)) from None
        self._listed[server] = tools

    async def _refresh_every(self, config: McpServerConfig) -> None:
        while True:
            await asyncio.sleep(config.refresh_seconds)
            try:
                await self.refresh(config.name)
            except McpServerError as err:
                log.warning("%s; its tools stay as last listed", err)

    def _caller(self, server: str, tool: str) -> Any:
        # The registry passes the model's arguments as keywords; the context's parameter has a name that no
        # argument of a JSON schema will have.
        async def call(_agentrun_context: ToolContext, **arguments: Any) -> str:
            return await self.call(server, tool, arguments, _agentrun_context)

        return call

    async def call(self, server: str, tool: str, arguments: dict[str, Any], context: ToolContext) -> str:
        """Calls the tool once; its text result, or ToolError for the model (the tool's error result, a refusal,
        a timeout) or ToolUnavailableError when the server cannot be reached (worth another attempt)."""
        session = self._sessions[server]
        config = session.config
        client = await session.client()
        try:
            # The session's call_tool, not the Client's: the Client re-sends a call after some answers (a changed
            # tool schema, input requests), and only Temporal retries here.
            result = await client.session.call_tool(
                tool,
                arguments,
                read_timeout_seconds=config.call_timeout_seconds,
                meta=cast(RequestParamsMeta, {IDEMPOTENCY_KEY_META: context.idempotency_key}),
            )
        except MCPError as err:
            if err.code == CONNECTION_CLOSED:
                await session.discard(client)
                raise ToolUnavailableError(f"MCP server {server!r} closed the connection during the call") from None
            if err.code == REQUEST_TIMEOUT:
                # Not retried: the tool may be running still, and a slow tool is as slow the next time.
                raise ToolError(
                    f"MCP server {server!r} did not answer the call of {tool!r} within "
                    f"{config.call_timeout_seconds:g} s"
                ) from None
            raise ToolError(f"MCP server {server!r} refused the call of {tool!r}: {err.message}") from None
        text = _text(result)
        if result.is_error:
            raise ToolError(f"MCP server {server!r}, tool {tool!r}: {text}")
        return text


def _text(result: CallToolResult) -> str:
    """What the model reads of a result: its text, and a note for content it cannot read."""
    parts = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        elif isinstance(block, EmbeddedResource) and isinstance(block.resource, TextResourceContents):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content left out]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content)
    return "\n".join(parts)


def _reason(err: BaseException) -> str:
    """The cause of a failure in words: the SDK's task groups wrap it in exception groups."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in err.exceptions)
    if isinstance(err, MCPError):
        return err.message
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
