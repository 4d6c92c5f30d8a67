"""The workflow code must replay every committed history: runs in flight survive a deploy."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.worker.record_histories import SCENARIOS
from worker.worker import SANDBOXED_RUNNER
from worker.workflows import AgentRunWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_scenario_has_a_history() -> None:
    # A sub-agent scenario has its child runs' histories beside its own ("delegation.child1.json").
    assert {p.name.split(".")[0] for p in HISTORIES} == set(SCENARIOS)
    assert {p.stem for p in HISTORIES} >= set(SCENARIOS)


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())  # noqa: ASYNC240 (a small local file)
    # In the sandbox, as the test workers run: its determinism checks guard the workflow code.
    await Replayer(workflows=[AgentRunWorkflow], workflow_runner=SANDBOXED_RUNNER).replay_workflow(history)


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_with_tracing_and_makes_no_spans(path: Path) -> None:
    # The worker traces with Temporal's OpenTelemetry interceptor when telemetry is on: a replay (after a worker
    # restart, or a cache eviction) must neither fail nor repeat the spans the run already made.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from temporalio.contrib.opentelemetry import TracingInterceptor

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    # Even spans without a parent from a client: the histories were recorded without tracing.
    interceptor = TracingInterceptor(provider.get_tracer("test"), always_create_workflow_spans=True)
    history = WorkflowHistory.from_json(path.stem, path.read_text())  # noqa: ASYNC240 (a small local file)
    replayer = Replayer(workflows=[AgentRunWorkflow], workflow_runner=SANDBOXED_RUNNER, interceptors=[interceptor])
    await replayer.replay_workflow(history)
    assert exported.get_finished_spans() == ()
