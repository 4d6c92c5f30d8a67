"""Traces and metrics as an operator sees them: the server and the worker run as separate processes and export
OTLP to a collector that the test hosts; the test process is the client and exports its own spans there too."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.testing import WorkflowEnvironment

from agentrun.client import AgentRunClient
from agentrun.v1 import agent_service_pb2 as pb
from devstack import collector as otlp
from devstack.stack import free_port, wait_until_serving
from shared.settings import Settings
from tests.conftest import AGENTS_FILE, Model
from tests.processes import service_env, spawn

CLIENT_SERVICE = "test-client"
PROMPT = "please echo this"


@dataclass
class Scenario:
    """One traced run with a tool call that waited for approval, and one plain run whose model call failed once and
    was retried, as the collector saw them."""

    collector: otlp.Collector
    trace_id: str
    caller: str  # the client's own span around StartRun and the first StreamRun
    run_id: str
    approval_id: str
    call_id: str
    events: list[pb.RunEvent]  # every event every stream of the traced run delivered
    plain_run_id: str
    plain_trace_id: str
    plain_events: list[pb.RunEvent]
    worker_log: Path  # the worker's log, as JSON


async def until(condition: Callable[[], bool], collector: otlp.Collector) -> None:
    async with asyncio.timeout(120):  # a bound for a stuck export, not a measure
        while not condition():
            await collector.wait()


@pytest.fixture(scope="module")
async def scenario(
    temporal_env: WorkflowEnvironment, redis_url: str, model: Model, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scenario]:
    unique = uuid.uuid4().hex[:12]
    settings = Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=f"test-{unique}",
        redis_url=redis_url,
        redis_prefix=f"test:{unique}:",
        agents_file=str(AGENTS_FILE),
        openai_base_url=model.base_url,
        openai_api_key="offline",
        tool_modules=("tests.worker.extra_tools",),
    )
    receiver, receiver_port, collector = await otlp.serve()
    endpoint = f"http://127.0.0.1:{receiver_port}"
    env = service_env(
        settings,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="300",
    )
    port = free_port()
    worker_log = tmp_path_factory.mktemp("telemetry") / "worker.log"
    with worker_log.open("wb") as log:  # the child keeps its own copy
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentrun.cli", "worker", env={**env, "AGENTRUN_LOG_FORMAT": "json"}, stderr=log
        )
    processes = [await spawn("server", "--port", str(port), env=env), worker]
    provider = TracerProvider(resource=Resource.create({"service.name": CLIENT_SERVICE}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("tests")
    key = model.script(
        {"tool_calls": [{"name": "echo", "arguments": {"text": "hello"}, "id": "call-echo-1"}]},
        {"text": "echoed hello"},
    )
    try:
        async with (
            asyncio.timeout(90),
            AgentRunClient(
                f"127.0.0.1:{port}",
                interceptors=aio_client_interceptors(tracer_provider=provider),  # type: ignore[no-untyped-call]
            ) as client,
        ):
            async with asyncio.timeout(30):
                await wait_until_serving(client.channel)
            events: list[pb.RunEvent] = []
            with tracer.start_as_current_span("caller") as caller:
                started = await client.stub.StartRun(
                    pb.StartRunRequest(agent="traced", input=f"{PROMPT} {key}", request_id=uuid.uuid4().hex)
                )
                async for event in client.stream_run(started.run_id):
                    events.append(event)
                    if event.HasField("approval_requested"):
                        break
            requested = events[-1].approval_requested
            # The approver is another service, in a trace of its own; so is a watcher that comes back later.
            await client.approve(started.run_id, requested.approval_id, pb.APPROVAL_DECISION_APPROVE, approver="ops")
            events += [e async for e in client.stream_run(started.run_id, after_sequence=events[-1].sequence)]
            # The model endpoint is overloaded at first: the model call is retried.
            flaky = model.script({"error": {"status": 503, "message": "busy", "retry_after": 0}}, {"text": "at last"})
            plain = await client.stub.StartRun(
                pb.StartRunRequest(agent="flaky", input=flaky, request_id=uuid.uuid4().hex)
            )
            plain_events = [e async for e in client.stream_run(plain.run_id)]
        # The collector answers on this event loop: flush from another thread.
        await asyncio.to_thread(provider.force_flush)
        scenario = Scenario(
            collector,
            started.trace_id,
            format(caller.get_span_context().span_id, "016x"),
            started.run_id,
            requested.approval_id,
            requested.call_id,
            events,
            plain.run_id,
            plain.trace_id,
            plain_events,
            worker_log,
        )

        def whole(trace_id: str, *names: str) -> bool:
            """The trace has the spans named and every span's parent (a batch may bring a child before it)."""
            spans = collector.trace(trace_id)
            ids = {span.span_id for span in spans}
            return set(names) <= {s.name for s in spans} and all(s.parent_id in ids for s in spans if s.parent_id)

        def complete() -> bool:
            return whole(
                started.trace_id, "caller", "CompleteWorkflow:AgentRunWorkflow", "approval.decision echo"
            ) and whole(plain.trace_id, "chat offline", "CompleteWorkflow:AgentRunWorkflow")

        await until(complete, collector)
        yield scenario
    finally:
        await asyncio.to_thread(provider.shutdown)
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await receiver.stop(0)


def by_name(spans: list[otlp.Span], name: str) -> list[otlp.Span]:
    found = [span for span in spans if span.name == name]
    assert found, f"no span {name!r} among {sorted({s.name for s in spans})}"
    return found


def ancestry(spans: list[otlp.Span], span: otlp.Span) -> list[tuple[str, str]]:
    """(name, service) of the span and each of its ancestors, up to the root."""
    by_id = {s.span_id: s for s in spans}
    chain = [(span.name, span.service)]
    while span.parent_id:
        span = by_id[span.parent_id]
        chain.append((span.name, span.service))
    return chain


START_RUN = "/agentrun.v1.AgentService/StartRun"


async def test_one_trace_from_the_client_through_the_server_and_the_workflow_to_the_model_and_the_tool(
    scenario: Scenario,
) -> None:
    assert len(scenario.trace_id) == 32 and int(scenario.trace_id, 16)
    spans = scenario.collector.trace(scenario.trace_id)
    # Every span's parent is in the trace: one root, the caller's own span.
    ids = {span.span_id for span in spans}
    roots = [span for span in spans if not span.parent_id]
    assert [(root.name, root.span_id) for root in roots] == [("caller", scenario.caller)]
    assert all(span.parent_id in ids for span in spans if span.parent_id)

    head = [
        (START_RUN, "agentrun-server"),
        (START_RUN, CLIENT_SERVICE),
        ("caller", CLIENT_SERVICE),
    ]
    workflow = [("StartWorkflow:AgentRunWorkflow", "agentrun-server"), *head]
    assert ancestry(spans, by_name(spans, "RunWorkflow:AgentRunWorkflow")[0]) == [
        ("RunWorkflow:AgentRunWorkflow", "agentrun-worker"),
        *workflow,
    ]
    model_rounds = sorted(by_name(spans, "chat offline"), key=lambda s: s.attributes["agentrun.model.round"])
    assert [s.attributes["agentrun.model.round"] for s in model_rounds] == [0, 1]
    for span in model_rounds:
        assert ancestry(spans, span) == [
            ("chat offline", "agentrun-worker"),
            ("RunActivity:call_model", "agentrun-worker"),
            ("StartActivity:call_model", "agentrun-worker"),
            *workflow,
        ]
    tool = by_name(spans, "execute_tool echo")[0]
    assert ancestry(spans, tool) == [
        ("execute_tool echo", "agentrun-worker"),
        ("RunActivity:run_tool", "agentrun-worker"),
        ("StartActivity:run_tool", "agentrun-worker"),
        *workflow,
    ]
    # Events are published, and conversations would be read and written, through Redis: its spans sit under the
    # activities that made them.
    publish = by_name(spans, "RunActivity:publish_events")[0]
    redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis" or "db.system.name" in s.attributes]
    assert any(s.parent_id == publish.span_id for s in redis_spans)
    assert any(ancestry(spans, s)[1][0] == "chat offline" for s in redis_spans)
    # The run's other activities are in the trace too.
    for name in ("RunActivity:publish_events", "CompleteWorkflow:AgentRunWorkflow"):  # the answer's round ended it
        by_name(spans, name)


async def test_the_model_span_follows_the_genai_conventions(scenario: Scenario) -> None:
    spans = scenario.collector.trace(scenario.trace_id)
    first, second = sorted(by_name(spans, "chat offline"), key=lambda s: s.attributes["agentrun.model.round"])
    usage = scenario.events[-1].run_completed.usage
    for span in (first, second):
        attributes = span.attributes
        assert span.proto.kind == span.proto.SPAN_KIND_CLIENT
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.request.model"] == "offline"
        assert attributes["gen_ai.response.model"] == "offline"
        assert attributes["gen_ai.response.id"].startswith("chatcmpl-")
        assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
        assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < span.duration_ms / 1000
        assert attributes["server.address"] == "127.0.0.1"
    assert first.attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert second.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in (first, second)) == usage.prompt_tokens
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in (first, second)) == usage.completion_tokens
    # This agent allows its content in traces: the prompt, the reply and the tool call's arguments and result.
    input_messages = json.loads(first.attributes["gen_ai.input.messages"])
    assert input_messages[-1]["role"] == "user" and PROMPT in input_messages[-1]["parts"][0]["content"]
    output = json.loads(first.attributes["gen_ai.output.messages"])
    assert output[0]["parts"] == [
        {"type": "tool_call", "id": "call-echo-1", "name": "echo", "arguments": '{"text": "hello"}'}
    ]
    assert json.loads(second.attributes["gen_ai.output.messages"])[0]["parts"][0]["content"] == "echoed hello"
    tool = by_name(spans, "execute_tool echo")[0].attributes
    assert tool["gen_ai.operation.name"] == "execute_tool"
    assert tool["gen_ai.tool.call.id"] == scenario.call_id == "call-echo-1"
    assert (tool["gen_ai.tool.call.arguments"], tool["gen_ai.tool.call.result"]) == ('{"text": "hello"}', "hello")
    # An agent without trace_content keeps its content out of traces.
    plain_rounds = by_name(scenario.collector.trace(scenario.plain_trace_id), "chat offline")
    plain = next(s.attributes for s in plain_rounds if "error.type" not in s.attributes)
    assert plain["gen_ai.usage.output_tokens"] > 0
    assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & set(plain)


async def test_start_run_returns_the_trace_and_other_calls_link_to_it(scenario: Scenario) -> None:
    collector = scenario.collector
    assert scenario.plain_trace_id != scenario.trace_id
    streams = [s for s in collector.spans if s.name == "/agentrun.v1.AgentService/StreamRun"]
    watched = [s for s in streams if s.service == "agentrun-server" and s.trace_id != scenario.trace_id]
    # The second StreamRun of the traced run was its own trace, linked to the run's.
    assert any(trace_id == scenario.trace_id for s in watched for trace_id, _ in s.links)


async def test_an_approval_is_a_request_span_and_a_decision_span_linked_to_it(scenario: Scenario) -> None:
    spans = scenario.collector.trace(scenario.trace_id)
    request = by_name(spans, "approval.request echo")[0]
    decision = by_name(spans, "approval.decision echo")[0]
    for span in (request, decision):
        assert span.attributes["agentrun.approval.id"] == scenario.approval_id
        assert span.attributes["gen_ai.tool.call.id"] == scenario.call_id
        # Neither stays open through the wait.
        assert span.proto.end_time_unix_nano >= span.proto.start_time_unix_nano
    assert request.proto.end_time_unix_nano < decision.proto.start_time_unix_nano
    assert decision.links == [(scenario.trace_id, request.span_id)]
    assert decision.attributes["agentrun.approval.decision"] == "approve"
    assert decision.attributes["agentrun.approval.approver"] == "ops"
    # The approver's call is a trace of its own; its server span links to the request, and the workflow's
    # handling of the decision, in the run's trace, links back to the approver's call.
    approves = [s for s in scenario.collector.spans if s.name == "/agentrun.v1.AgentService/Approve"]
    server_approve = next(s for s in approves if s.service == "agentrun-server")
    assert server_approve.trace_id != scenario.trace_id
    assert (scenario.trace_id, request.span_id) in server_approve.links
    handled = by_name(spans, "HandleUpdate:decide_approval")[0]
    assert handled.service == "agentrun-worker"
    assert handled.links and all(trace_id == server_approve.trace_id for trace_id, _ in handled.links)


async def test_a_retried_model_call_stays_in_the_run_s_trace(scenario: Scenario) -> None:
    spans = scenario.collector.trace(scenario.plain_trace_id)
    assert scenario.plain_events[-1].run_completed.output == "at last"
    attempts = sorted(by_name(spans, "RunActivity:call_model"), key=lambda s: s.proto.start_time_unix_nano)
    assert len(attempts) == 2
    # Both attempts are children of the one StartActivity span of the call.
    assert attempts[0].parent_id == attempts[1].parent_id
    by_id = {s.span_id: s for s in spans}
    assert by_id[attempts[0].parent_id].name == "StartActivity:call_model"
    failed, answered = (
        next(s for s in spans if s.parent_id == a.span_id and s.name == "chat offline") for a in attempts
    )
    assert failed.attributes["error.type"] == "ModelUnavailable"
    assert failed.proto.status.code == failed.proto.status.STATUS_CODE_ERROR
    assert "error.type" not in answered.attributes and answered.attributes["gen_ai.usage.output_tokens"] > 0


def total(collector: otlp.Collector, name: str, **attributes: Any) -> float:
    return sum(
        value
        for metric in collector.latest(name)
        for point, value in metric.points()
        if all(point.get(k) == v for k, v in attributes.items())
    )


def count(collector: otlp.Collector, name: str, **attributes: Any) -> int:
    return sum(
        n
        for metric in collector.latest(name)
        for point, n in metric.counts()
        if all(point.get(k) == v for k, v in attributes.items())
    )


async def test_the_run_produced_its_metrics(scenario: Scenario) -> None:
    collector = scenario.collector
    usage = scenario.events[-1].run_completed.usage
    plain_usage = scenario.plain_events[-1].run_completed.usage
    delivered = len(scenario.events) + len(scenario.plain_events)

    def exported() -> bool:
        return (
            total(collector, "agentrun.runs.ended", **{"agentrun.run.outcome": "completed"}) == 2
            and total(collector, "agentrun.stream.events") == delivered
            and total(collector, "agentrun.streams.open") == 0
            and count(collector, "gen_ai.client.operation.duration") == 4
        )

    await until(exported, collector)
    units = {metric.name: metric.proto.unit for metric in collector.metrics}
    assert {name: units.get(name) for name in EXPECTED_UNITS} == EXPECTED_UNITS
    assert total(collector, "agentrun.runs.started", **{"gen_ai.agent.name": "traced"}) == 1
    assert total(collector, "agentrun.runs.started", **{"gen_ai.agent.name": "flaky"}) == 1
    model = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "offline"}
    assert total(collector, "gen_ai.client.token.usage", **model, **{"gen_ai.token.type": "input"}) == (
        usage.prompt_tokens + plain_usage.prompt_tokens
    )
    assert total(collector, "gen_ai.client.token.usage", **model, **{"gen_ai.token.type": "output"}) == (
        usage.completion_tokens + plain_usage.completion_tokens
    )
    # Three model calls answered and one failed (the endpoint was overloaded), with the activity's error type.
    assert count(collector, "gen_ai.client.operation.duration", **model) == 4
    assert count(collector, "gen_ai.client.operation.duration", **{"error.type": "ModelUnavailable"}) == 1
    assert count(collector, "gen_ai.client.operation.time_to_first_chunk", **model) == 3
    assert (
        0
        < total(collector, "gen_ai.client.operation.time_to_first_chunk")
        < total(collector, "gen_ai.client.operation.duration")
    )
    tool = {"gen_ai.tool.name": "echo", "agentrun.tool.status": "completed"}
    assert total(collector, "agentrun.tool.calls", **tool) == 1
    assert count(collector, "agentrun.approval.wait", **{"agentrun.approval.decision": "approve"}) == 1
    assert total(collector, "agentrun.approval.wait") > 0


EXPECTED_UNITS = {
    "agentrun.runs.started": "{run}",
    "agentrun.runs.ended": "{run}",
    "gen_ai.client.operation.duration": "s",
    "gen_ai.client.operation.time_to_first_chunk": "s",
    "gen_ai.client.token.usage": "{token}",
    "agentrun.tool.calls": "{call}",
    "agentrun.approval.wait": "s",
    "agentrun.streams.open": "{stream}",
    "agentrun.stream.events": "{event}",
}


async def test_the_worker_s_json_logs_carry_the_trace_and_the_run(scenario: Scenario) -> None:
    entries = [json.loads(line) for line in scenario.worker_log.read_text().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    # The model client logs each request it makes: in the activity, so with the run's trace and id.
    requests = [e for e in entries if "/chat/completions" in e["message"] and e.get("run_id") == scenario.run_id]
    assert requests and {e["trace_id"] for e in requests} == {scenario.trace_id}


async def test_agentrun_dev_prints_the_demo_run_s_trace_as_a_tree() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REDIS_URL", "AGENTRUN_", "OTEL_"))}
    ports = [str(free_port()) for _ in range(3)]
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "agentrun.cli", "dev", "--once", "--trace", "--prompt", "say hello"),
        *("--port", ports[0], "--temporal-port", ports[1], "--ui-port", ports[2]),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode()

    assert process.returncode == 0, text
    assert "You said: say hello" in text
    lines = text.splitlines()
    # The run's trace, each span indented under its parent.
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(START_RUN))
    indent = len(lines[start]) - len(lines[start].lstrip())
    children = [line for line in lines[start + 1 :] if line.startswith(" " * (indent + 2) + line.strip())]
    assert any(child.strip().startswith("StartWorkflow:AgentRunWorkflow  [agentrun-dev]") for child in children)
    assert any(line.strip().startswith("chat gpt-4o-mini  [agentrun-dev]") for line in lines[start:])
    # The Temporal dev server exports its own traces too when asked; they are not printed.
    assert "io.temporal" not in text
