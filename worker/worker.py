"""The worker service: polls the task queue and executes agent runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx2
import openai
import redis.asyncio as redis
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from shared import telemetry
from shared.agents import AgentConfig, AgentConfigError, load_agents, load_mcp_servers
from shared.conversations import ConversationStore
from shared.run_stream import RunStreamWriter
from shared.settings import OFFLINE_API_KEY, Settings, connect_redis, connect_temporal, stop_on_signals
from shared.transcripts import TranscriptStore
from worker._mcp import McpServers
from worker.activities import HEARTBEAT_INTERVAL_SECONDS, RunActivities
from worker.tools import ToolRegistry, default_registry
from worker.workflows import AgentRunWorkflow

log = logging.getLogger("agentrun.worker")

# The workflow's types come from ``shared`` and it imports the activities for their names, which pull in these
# libraries. The workflow never calls them, so the sandbox passes them through instead of re-importing them; the
# types must be the same classes inside and outside the sandbox for Temporal's converter to resolve their fields.
SANDBOXED_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(
        "shared", "agentrun", "google.protobuf", "jsonschema", "openai", "redis", "opentelemetry", "yaml"
    )
)

OFFLINE_TOKEN_DELAY_SECONDS = 0.03
MODEL_CONNECT_TIMEOUT_SECONDS = 5.0
MODEL_READ_TIMEOUT_SECONDS = 600.0
# How long a stopping worker lets the model and tool calls in flight finish before it cancels them.
SHUTDOWN_GRACE_SECONDS = 10.0


def build_worker(
    client: Client,
    settings: Settings,
    *,
    redis_client: redis.Redis,
    model: openai.AsyncOpenAI,
    agents: dict[str, AgentConfig],
    tools: ToolRegistry | None = None,
    sandboxed: bool = False,
    shutdown_grace_seconds: float = SHUTDOWN_GRACE_SECONDS,
) -> Worker:
    """The worker for ``settings.task_queue``.

    Production runs workflows without Temporal's sandbox: re-importing the
    workflow module into a fresh sandbox costs 6-15 ms on every run's first
    workflow task, a third of the time to first token. The sandbox's determinism
    checks still guard the code: the test suite runs its workers sandboxed, and
    the replay tests replay committed histories in the sandbox.
    """
    tools = tools or default_registry(settings.tool_modules)
    for agent in agents.values():
        missing = sorted(set(agent.tools) - set(tools.names()))
        if missing:
            raise AgentConfigError(
                f"agent {agent.name!r} uses tools this worker does not have: {', '.join(missing)} "
                f"(it has: {', '.join(tools.names())})"
            )
    activities = RunActivities(
        model,
        RunStreamWriter(redis_client, settings.redis_prefix, settings.stream_ttl_seconds),
        tools,
        ConversationStore(redis_client, settings.redis_prefix),
        TranscriptStore(redis_client, settings.redis_prefix),
    )
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[AgentRunWorkflow],
        workflow_runner=SANDBOXED_RUNNER if sandboxed else UnsandboxedWorkflowRunner(),
        activities=[
            activities.call_model,
            activities.run_tool,
            activities.publish_events,
            activities.publish_terminal_event,
        ],
        # Heartbeats carry cancellation to a streaming model call; send them often
        # enough that CancelRun takes effect within about a second.
        max_heartbeat_throttle_interval=timedelta(seconds=HEARTBEAT_INTERVAL_SECONDS),
        default_heartbeat_throttle_interval=timedelta(seconds=HEARTBEAT_INTERVAL_SECONDS),
        graceful_shutdown_timeout=timedelta(seconds=shutdown_grace_seconds),
        # Set on purpose (the SDK's default is 100 activities): see Settings.worker_activities.
        max_concurrent_activities=settings.worker_activities,
        max_concurrent_local_activities=settings.worker_activities,
        max_concurrent_workflow_tasks=settings.worker_workflow_tasks,
    )


@contextlib.asynccontextmanager
async def model_client(settings: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    """The configured OpenAI-compatible endpoint, or the offline model when none is configured."""
    if settings.openai_base_url or settings.openai_api_key:
        async with _openai_client(settings, settings.openai_base_url, settings.openai_api_key or "unset") as client:
            yield client
        return
    from worker import offline_model

    # Paced like a hosted model, so that a person watching sees the answer stream.
    runner, base_url = await offline_model.serve(token_delay=OFFLINE_TOKEN_DELAY_SECONDS)
    log.warning("no OPENAI_BASE_URL or OPENAI_API_KEY set: using the OFFLINE model at %s", base_url)
    try:
        async with _openai_client(settings, base_url, OFFLINE_API_KEY) as client:
            yield client
    finally:
        await runner.cleanup()


def _openai_client(settings: Settings, base_url: str | None, api_key: str) -> openai.AsyncOpenAI:
    """The ``openai`` client with its limits set on purpose.

    No retries of its own: Temporal retries the activity durably, after the delay the endpoint asks for. One
    connection per activity that may run at once, all kept alive, so a busy worker does not reconnect per call. A
    reply may pause for minutes (a reasoning model thinking) but a connection must open within seconds.
    """
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=httpx2.Timeout(MODEL_READ_TIMEOUT_SECONDS, connect=MODEL_CONNECT_TIMEOUT_SECONDS),
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(
                max_connections=settings.worker_activities, max_keepalive_connections=settings.worker_activities
            )
        ),
    )


async def run_worker(
    settings: Settings, *, stop: asyncio.Event | None = None, shutdown_grace_seconds: float = SHUTDOWN_GRACE_SECONDS
) -> None:
    """Runs the worker until ``stop`` is set or the process gets SIGINT/SIGTERM, then drains: the calls in flight
    get ``shutdown_grace_seconds`` to finish before they are cancelled."""
    agents = load_agents(settings.agents_file)
    mcp_servers = load_mcp_servers(settings.agents_file)
    stop = stop or stop_on_signals()
    telemetry.setup("agentrun-worker")
    client = await connect_temporal(settings)
    redis_client = connect_redis(settings, name="agentrun-worker", wait_out_outages=True)
    await redis_client.ping()
    tools = default_registry(settings.tool_modules)
    try:
        # Every MCP server an agent uses is connected and its tools listed before the worker takes any task: one
        # that cannot be reached stops the start with McpServerError naming it.
        async with McpServers.used_by(agents.values(), mcp_servers, tools), model_client(settings) as model:
            worker = build_worker(
                client,
                settings,
                redis_client=redis_client,
                model=model,
                agents=agents,
                tools=tools,
                shutdown_grace_seconds=shutdown_grace_seconds,
            )
            async with worker:
                log.info("worker polling task queue %r on %s", settings.task_queue, settings.temporal_address)
                await stop.wait()
                log.info("worker shutting down")
    finally:
        await redis_client.aclose()
        telemetry.shutdown()
