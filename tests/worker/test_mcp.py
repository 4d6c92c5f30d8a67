"""MCP tools end to end: real MCP servers (tests/worker/mcp_servers.py) over stdio and streamable HTTP, called by
runs on the real stack."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml
from temporalio.api.enums.v1 import EventType

from agentrun.v1 import agent_service_pb2 as pb
from devstack.stack import free_port
from shared.agents import load_mcp_servers
from shared.settings import Settings
from tests.agent_service.test_agent_loop import approve, calls, tool_messages, until
from tests.agent_service.test_runs import collect
from tests.conftest import Stack
from tests.processes import service_env
from worker._mcp import McpServers
from worker.tools import ToolRegistry, default_registry

REPO = Path(__file__).parent.parent.parent
TOKEN = "test-token-7f3a"


@dataclass
class HttpServer:
    url: str
    process: asyncio.subprocess.Process

    async def stop(self) -> None:
        self.process.kill()
        await self.process.wait()


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[HttpServer]:
    """The test MCP server over streamable HTTP, in a process of its own on a free port."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.worker.mcp_servers", "http", str(port), cwd=REPO
    )
    server = HttpServer(f"http://127.0.0.1:{port}/mcp", process)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                assert process.returncode is None, "the MCP test server exited"
                await asyncio.sleep(0.05)
        yield server
    finally:
        if process.returncode is None:
            await server.stop()


@pytest.fixture
async def remote() -> AsyncIterator[HttpServer]:
    async with http_server() as server:
        yield server


@pytest.fixture
def agents_file(tmp_path: Path, remote: HttpServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MCP_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("MCP_TEST_GREETING", "hello from the worker")
    monkeypatch.delenv("MCP_TEST_UNSET", raising=False)
    document = {
        "mcp_servers": {
            "local": {
                "command": sys.executable,
                "args": ["-m", "tests.worker.mcp_servers", "stdio"],
                "cwd": str(REPO),
                "env": {"GREETING": "${MCP_TEST_GREETING}"},
            },
            "remote": {"url": remote.url, "bearer_token_env": "MCP_TEST_TOKEN", "call_timeout_seconds": 20},
            "slow": {
                "command": sys.executable,
                "args": ["-m", "tests.worker.mcp_servers", "stdio"],
                "cwd": str(REPO),
                "call_timeout_seconds": 1,
            },
            "missing": {"command": str(tmp_path / "no-such-server")},
            "unset": {"command": sys.executable, "env": {"KEY": "${MCP_TEST_UNSET}"}},
        },
        "agents": {
            "mcp": {
                "model": "offline",
                "tools": ["echo"],
                "mcp_servers": {
                    "local": {"deny": ["secret", "grow", "re*", "sleep"]},
                    "remote": {"allow": ["add", "authorization", "fail", "secret"], "deny": ["secret"]},
                },
            },
            "mcp-only": {"model": "offline", "max_iterations": 2, "mcp_servers": {"remote": {"allow": ["add"]}}},
            "growing": {
                "model": "offline",
                "tools": ["echo"],
                "approval": {"require": ["echo"]},
                "mcp_servers": {"remote": {}},
            },
            "guarded": {
                "model": "offline",
                "approval": {"require": ["mcp_remote_add"]},
                "mcp_servers": {"remote": {"allow": ["add", "fail"]}},
            },
            "impatient": {"model": "offline", "mcp_servers": {"slow": {"allow": ["sleep"]}}},
            "broken": {"model": "offline", "mcp_servers": {"missing": None, "unset": None}},
        },
    }
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def settings(settings: Settings, agents_file: Path) -> Settings:
    return replace(settings, agents_file=str(agents_file))


@dataclass
class McpStack:
    stack: Stack
    servers: McpServers
    tools: ToolRegistry


@pytest.fixture
async def mcp(stack: Stack) -> AsyncIterator[McpStack]:
    """The stack's worker restarted with the tools of the servers 'local' and 'remote' (as run_worker does)."""
    configs = load_mcp_servers(stack.settings.agents_file)
    tools = default_registry(stack.settings.tool_modules)
    async with McpServers([configs["local"], configs["remote"]], tools) as servers:
        await stack.restart_worker(tools=tools)
        yield McpStack(stack, servers, tools)


def offered(request: dict[str, object]) -> set[str]:
    return {tool["function"]["name"] for tool in request.get("tools", [])}  # type: ignore[attr-defined]


def finished_events(events: list[pb.RunEvent]) -> list[pb.ToolCallFinished]:
    return [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]


async def test_a_run_calls_tools_over_stdio_and_http(mcp: McpStack) -> None:
    stack = mcp.stack
    key = stack.model.script(
        calls(
            ("mcp_local_add", {"a": 2, "b": 3}),
            ("mcp_local_environment", {"name": "GREETING"}),
            ("mcp_remote_add", {"a": 40, "b": 2}),
            ("mcp_remote_authorization", {}),
            ("mcp_local_idempotency_key", {}),
        ),
        {"text": "done"},
    )
    run_id = await stack.client.start_run("mcp", key)

    events = await collect(stack, run_id)

    finished = {f.tool_name: f for f in finished_events(events)}  # in the order they finished
    assert {f.status for f in finished.values()} == {pb.TOOL_CALL_STATUS_COMPLETED}
    key_call = finished.pop("mcp_local_idempotency_key")
    assert {name: f.result for name, f in finished.items()} == {
        "mcp_local_add": "5",
        "mcp_local_environment": "hello from the worker",
        "mcp_remote_add": "42",
        "mcp_remote_authorization": f"Bearer {TOKEN}",
    }
    # The call carries the idempotency key that every retry of it carries.
    assert key_call.result == f"{run_id}:{key_call.call_id}"
    requests = stack.model.server.requests_for(key)
    assert [m["content"] for m in tool_messages(requests[1])][:4] == [
        "5",
        "hello from the worker",
        "42",
        f"Bearer {TOKEN}",
    ]
    assert events[-1].run_completed.output == "done"


async def test_filters_decide_which_tools_the_model_is_offered_and_may_call(mcp: McpStack) -> None:
    stack = mcp.stack
    key = stack.model.script(calls(("mcp_local_secret", {}), ("mcp_remote_secret", {})), {"text": "no secrets"})
    run_id = await stack.client.start_run("mcp", key)

    events = await collect(stack, run_id)

    first = stack.model.server.requests_for(key)[0]
    local = {"add", "fail", "environment", "authorization", "idempotency_key", "crash_once"}
    assert offered(first) == {
        "echo",
        *(f"mcp_local_{name}" for name in local),
        *(f"mcp_remote_{name}" for name in ("add", "authorization", "fail")),
    }
    finished = finished_events(events)
    assert [f.status for f in finished] == [pb.TOOL_CALL_STATUS_FAILED] * 2
    assert all(f.error.startswith(f"unknown tool {f.tool_name!r}; available tools: echo, ") for f in finished)
    assert events[-1].run_completed.output == "no secrets"


async def test_an_error_result_reaches_the_model_as_an_error(mcp: McpStack) -> None:
    stack = mcp.stack
    key = stack.model.script(calls(("mcp_remote_fail", {"reason": "the disk is full"})), {"text": "sorry"})
    run_id = await stack.client.start_run("mcp", key)

    events = await collect(stack, run_id)

    (finished,) = finished_events(events)
    assert finished.status == pb.TOOL_CALL_STATUS_FAILED
    assert finished.error.startswith("MCP server 'remote', tool 'fail': ") and "the disk is full" in finished.error
    (message,) = tool_messages(stack.model.server.requests_for(key)[1])
    assert message["content"] == f"error: {finished.error}"
    # An error result is an answer: the call ran once.
    assert await run_tool_attempts(stack, run_id) == [1]


async def test_a_stdio_server_that_dies_during_a_call_is_started_again_for_the_one_retry(
    mcp: McpStack, tmp_path: Path
) -> None:
    stack = mcp.stack
    marker = str(tmp_path / "crashed")
    key = stack.model.script(calls(("mcp_local_crash_once", {"marker": marker})), {"text": "it recovered"})
    run_id = await stack.client.start_run("mcp", key)

    events = await collect(stack, run_id)

    (finished,) = finished_events(events)
    assert (finished.status, finished.result) == (pb.TOOL_CALL_STATUS_COMPLETED, "recovered")
    # The first attempt lost its server; Temporal's retry, on a new session, was the only other attempt.
    assert await run_tool_attempts(stack, run_id) == [2]
    assert events[-1].run_completed.output == "it recovered"


async def test_an_unreachable_server_during_a_call_is_retried_then_named_to_the_model(
    mcp: McpStack, remote: HttpServer
) -> None:
    stack = mcp.stack
    await remote.stop()
    key = stack.model.script(calls(("mcp_remote_add", {"a": 1, "b": 1})), {"text": "the server is down"})
    run_id = await stack.client.start_run("mcp", key)

    events = await collect(stack, run_id)

    (finished,) = finished_events(events)
    assert finished.status == pb.TOOL_CALL_STATUS_FAILED
    assert finished.error.startswith("MCP server 'remote' (streamable HTTP: http://127.0.0.1:")
    assert "cannot be reached" in finished.error and finished.error.endswith("(tried 5 times)")
    assert await run_tool_attempts(stack, run_id) == [5]
    assert events[-1].run_completed.output == "the server is down"


async def test_approval_policies_name_mcp_tools_as_the_model_sees_them(mcp: McpStack) -> None:
    stack = mcp.stack
    both = calls(("mcp_remote_add", {"a": 1, "b": 2}), ("mcp_remote_fail", {"reason": "x"}))
    key = stack.model.script(both, {"text": "ok"})
    run_id = await stack.client.start_run("guarded", key)
    _, requested = await until(stack, run_id, "approval_requested")

    assert requested.approval_requested.tool_name == "mcp_remote_add"
    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id)

    finished = {f.tool_name: f for f in finished_events(events)}
    assert finished["mcp_remote_add"].result == "3"
    assert finished["mcp_remote_fail"].status == pb.TOOL_CALL_STATUS_FAILED
    assert [e.approval_requested.tool_name for e in events if e.HasField("approval_requested")] == ["mcp_remote_add"]


async def test_a_call_past_its_timeout_is_an_error_for_the_model_and_the_session_goes_on(stack: Stack) -> None:
    tools = default_registry(stack.settings.tool_modules)
    async with McpServers([load_mcp_servers(stack.settings.agents_file)["slow"]], tools):
        await stack.restart_worker(tools=tools)
        key = stack.model.script(
            calls(("mcp_slow_sleep", {"seconds": 30})), calls(("mcp_slow_sleep", {"seconds": 0})), {"text": "ok"}
        )
        run_id = await stack.client.start_run("impatient", key)

        events = await collect(stack, run_id)

    late, quick = finished_events(events)
    assert late.status == pb.TOOL_CALL_STATUS_FAILED
    assert late.error == "MCP server 'slow' did not answer the call of 'sleep' within 1 s"
    assert (quick.status, quick.result) == (pb.TOOL_CALL_STATUS_COMPLETED, "slept 0.0 s")
    # A call that timed out is not tried again: it may still be running, and would be as slow again.
    assert await run_tool_attempts(stack, run_id) == [1, 1]


async def test_an_agent_with_only_mcp_tools_gets_no_tools_in_its_last_round(mcp: McpStack) -> None:
    stack = mcp.stack
    key = stack.model.script(calls(("mcp_remote_add", {"a": 1, "b": 2})), {"text": "3"})
    run_id = await stack.client.start_run("mcp-only", key)

    events = await collect(stack, run_id)

    assert finished_events(events)[0].result == "3"
    first, last = stack.model.server.requests_for(key)
    assert offered(first) == {"mcp_remote_add"}
    assert "tools" not in last and "Answer now" in last["messages"][-1]["content"]


async def first_call_waiting_for_approval(stack: Stack, tool: str) -> tuple[str, str, str]:
    """Starts a run of 'growing' whose first round calls ``tool`` beside an echo that waits for approval; once
    ``tool`` has finished, returns the run id, its script key and the approval id."""
    key = stack.model.script(calls((tool, {}), ("echo", {"text": "wait"})), {"text": "done"})
    run_id = await stack.client.start_run("growing", key)
    seen: dict[str | None, pb.RunEvent] = {}
    async for event in stack.client.stream_run(run_id):
        seen.setdefault(event.WhichOneof("kind"), event)
        if {"approval_requested", "tool_call_finished"} <= set(seen):
            break
    assert seen["tool_call_finished"].tool_call_finished.status == pb.TOOL_CALL_STATUS_COMPLETED
    return run_id, key, seen["approval_requested"].approval_requested.approval_id


async def test_a_refresh_offers_new_tools_to_new_runs_while_a_running_run_keeps_its_own(mcp: McpStack) -> None:
    stack = mcp.stack
    run_id, key, approval_id = await first_call_waiting_for_approval(stack, "mcp_remote_grow")
    await mcp.servers.refresh("remote")  # the server has 'multiply' now
    later = stack.model.script({"text": "hi"})
    await collect(stack, await stack.client.start_run("growing", later))

    await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id)

    assert events[-1].run_completed.output == "done"
    first, second = stack.model.server.requests_for(key)
    assert "mcp_remote_add" in offered(first) and offered(first) == offered(second)
    assert "mcp_remote_multiply" not in offered(second)
    assert offered(stack.model.server.requests_for(later)[0]) == offered(first) | {"mcp_remote_multiply"}


async def test_a_tool_whose_schema_changed_under_a_running_run_fails_it_naming_the_tool(mcp: McpStack) -> None:
    stack = mcp.stack
    run_id, key, approval_id = await first_call_waiting_for_approval(stack, "mcp_remote_reshape")
    await mcp.servers.refresh("remote")  # 'add' takes a third argument now

    await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id)

    assert "its tool 'mcp_remote_add' takes other arguments than when the run started" in events[-1].run_failed.error
    assert len(stack.model.server.requests_for(key)) == 1


async def test_a_worker_refuses_to_start_naming_each_server_it_cannot_reach(
    stack: Stack, remote: HttpServer, agents_file: Path
) -> None:
    await remote.stop()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentrun.cli",
        "worker",
        env=service_env(stack.settings),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()

    assert process.returncode == 1
    (message,) = [line for line in stderr.decode().splitlines() if line.startswith("agentrun worker: ")]
    assert f"MCP server 'missing' (stdio: {agents_file.parent / 'no-such-server'}) cannot be reached: " in message
    assert "FileNotFoundError" in message
    assert f"MCP server 'remote' (streamable HTTP: {load_mcp_servers(agents_file)['remote'].url}) cannot be" in message
    assert "MCP server 'unset': env.KEY names ${MCP_TEST_UNSET}, which is not set in the worker's environment" in (
        message
    )
    assert "'local'" not in message


async def run_tool_attempts(stack: Stack, run_id: str) -> list[int]:
    """The attempt on which each run_tool activity of the run ended."""
    history = await stack.temporal.get_workflow_handle(run_id).fetch_history()
    scheduled = {
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "run_tool"
    }
    return [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.scheduled_event_id in scheduled
    ]
