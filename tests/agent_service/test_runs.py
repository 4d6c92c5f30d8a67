"""End to end over real sockets: gRPC server, Temporal dev server, Redis, worker, offline model."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc
from shared.conversations import ConversationStore
from shared.run_stream import stream_key
from tests.conftest import Stack, details

WORDS = [f"word{i} " for i in range(40)]
TEXT = "".join(WORDS)


async def collect(stack: Stack, run_id: str, after: int = 0) -> list[pb.RunEvent]:
    return [event async for event in stack.client.stream_run(run_id, after_sequence=after)]


def text_of(events: list[pb.RunEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


def kinds(events: list[pb.RunEvent]) -> list[str | None]:
    return [e.WhichOneof("kind") for e in events]


async def wait_for_state(stack: Stack, run_id: str, state: int) -> pb.Run:
    for _ in range(200):
        run = await stack.client.get_run(run_id)
        if run.state == state:
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} stayed {pb.RunState.Name(run.state)}")


async def test_stream_is_complete_ordered_and_ends_with_the_result(stack: Stack) -> None:
    key = stack.model.script({"chunks": WORDS})
    run_id = await stack.client.start_run("assistant", f"{key} count for me")

    events = await collect(stack, run_id)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # Text that arrives while a write is in flight travels in one event, so there may be fewer events than chunks.
    assert set(kinds(events[:-1])) == {"text_delta"} and kinds(events)[-1] == "run_completed"
    assert len(events) <= len(WORDS) + 1
    assert text_of(events) == TEXT
    done = events[-1].run_completed
    assert done.output == TEXT
    assert done.usage.completion_tokens == len(WORDS)
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert all(e.time.seconds > 0 for e in events)
    assert all(list(e.agent_path) == ["assistant"] for e in events)
    # The model saw the agent's system prompt and the user's input.
    sent = stack.model.server.requests_for(key)[0]["messages"]
    assert sent == [
        {"role": "system", "content": "You are a test assistant."},
        {"role": "user", "content": f"{key} count for me"},
    ]


async def test_resume_from_a_middle_sequence_continues_without_gap_or_repeat(stack: Stack) -> None:
    key = stack.model.script({"chunks": WORDS, "delay_ms": 10})
    run_id = await stack.client.start_run("assistant", key)
    first: list[pb.RunEvent] = []
    async for event in stack.client.stream_run(run_id):
        first.append(event)
        if len(first) == 7:
            break  # the client goes away mid-run

    rest = await collect(stack, run_id, after=first[-1].sequence)

    events = first + rest
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == TEXT
    # A finished run replays the same events from any point.
    middle = len(events) // 2
    assert await collect(stack, run_id, after=middle) == events[middle:]
    assert await collect(stack, run_id, after=events[-1].sequence) == []


async def test_several_subscribers_each_get_the_whole_stream(stack: Stack) -> None:
    key = stack.model.script({"chunks": WORDS, "delay_ms": 5})
    run_id = await stack.client.start_run("assistant", key)

    streams = await asyncio.gather(*(collect(stack, run_id) for _ in range(3)))

    assert streams[0] == streams[1] == streams[2]
    assert text_of(streams[0]) == TEXT


async def test_a_burst_of_streams_at_once_is_served_not_shed(stack: Stack) -> None:
    # More calls at once than gRPC queues by default (1,000): every client of a dead replica failing over here.
    burst, channels = 1500, 3
    run_id = await stack.client.start_run("assistant", stack.model.script({"chunks": WORDS}))
    expected = await collect(stack, run_id)
    # Raw stubs, since the client library would retry a shed call: the server itself must serve every one.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(stack.address, options=own_connection) for _ in range(channels)]
    stubs = [pb_grpc.AgentServiceStub(channel) for channel in opened]

    async def stream(i: int) -> list[pb.RunEvent]:
        call = stubs[i % channels].StreamRun(pb.StreamRunRequest(run_id=run_id))
        return [response.event async for response in call]

    try:
        streams = await asyncio.gather(*(stream(i) for i in range(burst)), return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))

    failures = [err for err in streams if isinstance(err, BaseException)]
    assert not failures, f"{len(failures)} of {burst} streams failed, the first with {failures[0]}"
    assert all(events == expected for events in streams)


async def test_a_disconnecting_subscriber_does_not_cancel_the_run(stack: Stack) -> None:
    key = stack.model.script({"chunks": WORDS, "delay_ms": 20})
    run_id = await stack.client.start_run("assistant", key)
    call = stack.client.stub.StreamRun(pb.StreamRunRequest(run_id=run_id))
    async for _ in call:
        break
    call.cancel()

    run = await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)

    assert run.output == TEXT


async def test_start_is_idempotent_by_request_id(stack: Stack) -> None:
    key = stack.model.script({"text": "once"})
    first = await stack.client.start_run("assistant", key, request_id="req-sequential")
    again = await stack.client.start_run("assistant", key, request_id="req-sequential")
    assert again == first
    await collect(stack, first)
    # Still the same run after it has finished.
    assert await stack.client.start_run("assistant", key, request_id="req-sequential") == first
    assert await stack.client.start_run("assistant", key, request_id="req-other") != first


async def test_a_request_id_reused_for_another_request_is_already_exists(stack: Stack) -> None:
    key = stack.model.script({"text": "first"})
    first = await stack.client.start_run("assistant", key, request_id="req-reused")
    others = [("assistant", f"{key} and more", ""), ("tools", key, ""), ("assistant", key, "conv-other")]

    for agent, text, conversation in others:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.client.start_run(agent, text, request_id="req-reused", conversation_id=conversation)
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert details(raised.value).startswith(f"request_id: {first} was started with it by another request")

    # Refused before anything was written for it, and the same request still finds its run.
    assert await ConversationStore(stack.redis, stack.settings.redis_prefix).messages("conv-other") == []
    assert await stack.client.start_run("assistant", key, request_id="req-reused") == first
    assert (await collect(stack, first))[-1].run_completed.output == "first"


async def test_concurrent_duplicates_start_one_run(stack: Stack) -> None:
    key = stack.model.script({"text": "only one"})

    run_ids = await asyncio.gather(
        *(stack.client.start_run("assistant", key, request_id="req-concurrent") for _ in range(10))
    )

    assert len(set(run_ids)) == 1
    await collect(stack, run_ids[0])
    assert len(stack.model.server.requests_for(key)) == 1  # one run, one model call


@pytest.mark.parametrize(
    ("start", "field"),
    [
        (pb.StartRunRequest(agent="assistant", input=""), "input"),
        (pb.StartRunRequest(agent="assistant", input="   "), "input"),
        (pb.StartRunRequest(agent="", input="hi"), "agent"),
        (pb.StartRunRequest(agent="assistant", input="hi", request_id="has space"), "request_id"),
        (pb.StartRunRequest(agent="assistant", input="hi", conversation_id="x" * 129), "conversation_id"),
        (pb.StartRunRequest(agent="assistant", input="x" * (1 << 20 + 1)), "input"),
    ],
)
async def test_start_rejects_bad_fields(stack: Stack, start: pb.StartRunRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.stub.StartRun(start)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value).startswith(f"{field}:")


async def test_unknown_agent_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.start_run("no-such-agent", "hi")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-agent" in details(raised.value)


async def test_unknown_run_is_not_found_everywhere(stack: Stack) -> None:
    calls = [
        stack.client.get_run("run-missing"),
        stack.client.cancel_run("run-missing"),
        collect(stack, "run-missing"),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "run-missing" in details(raised.value)


async def test_run_requests_reject_bad_fields(stack: Stack) -> None:
    cases = [
        (stack.client.get_run(""), "run_id:"),
        (stack.client.cancel_run("bad id!"), "run_id:"),
        (stack.client.cancel_run("run-x", reason="x" * 2001), "reason:"),
        (collect(stack, "run-x", after=-1), "after_sequence:"),
        (stack.client.list_runs(page_size=-1), "page_size:"),
        (stack.client.list_runs(page_size=1001), "page_size:"),
        (stack.client.list_runs(page_token="!!not-base64!!"), "page_token:"),
    ]
    for call, prefix in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(raised.value).startswith(prefix)


async def test_cancel_stops_the_run_promptly(stack: Stack) -> None:
    many = [f"w{i} " for i in range(2000)]
    key = stack.model.script({"chunks": many, "delay_ms": 20})
    run_id = await stack.client.start_run("assistant", key)
    events = []
    async for event in stack.client.stream_run(run_id):
        events.append(event)
        if len(events) == 3:
            await stack.client.cancel_run(run_id, reason="user pressed stop")

    assert events[-1].HasField("run_cancelled")
    assert events[-1].run_cancelled.reason == "user pressed stop"
    # It stopped long before the model would have finished (2000 deltas, 40 s).
    assert len(events) < 500
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    run = await stack.client.get_run(run_id)
    assert run.state == pb.RUN_STATE_CANCELLED
    assert run.end_time.seconds > 0
    await stack.client.cancel_run(run_id)  # again: harmless


async def test_cancelling_a_finished_run_is_a_failed_precondition(stack: Stack) -> None:
    run_id = await stack.client.start_run("assistant", "hello")
    await collect(stack, run_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.cancel_run(run_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_get_run_reports_a_completed_run(stack: Stack) -> None:
    key = stack.model.script({"text": "The answer is 42."})
    run_id = await stack.client.start_run("assistant", key, conversation_id="conv-1")
    events = await collect(stack, run_id)

    run = await stack.client.get_run(run_id)

    assert run.run_id == run_id
    assert run.agent == "assistant"
    assert run.conversation_id == "conv-1"
    assert run.state == pb.RUN_STATE_COMPLETED
    assert run.output == "The answer is 42."
    assert run.usage == events[-1].run_completed.usage
    assert run.create_time.ToDatetime() <= run.end_time.ToDatetime()


async def test_get_and_stream_work_after_the_redis_stream_is_gone(stack: Stack) -> None:
    key = stack.model.script({"text": "kept by Temporal"})
    run_id = await stack.client.start_run("assistant", key)
    events = await collect(stack, run_id)
    await stack.temporal.get_workflow_handle(run_id).result()  # Redis loses the stream after the run has ended
    await stack.redis.delete(stream_key(stack.settings.redis_prefix, run_id))

    run = await stack.client.get_run(run_id)
    rebuilt = await collect(stack, run_id)

    assert run.state == pb.RUN_STATE_COMPLETED
    assert run.output == "kept by Temporal"
    # The client is told which events are gone, then gets the terminal event rebuilt from Temporal's record.
    lost, terminal = rebuilt
    assert (lost.events_lost.first_sequence, lost.sequence) == (1, events[-1].sequence - 1)
    assert terminal.sequence == events[-1].sequence
    assert terminal.run_completed == events[-1].run_completed
    # A client that saw the terminal event gets nothing more.
    assert await collect(stack, run_id, after=events[-1].sequence) == []


async def test_a_model_that_keeps_failing_fails_the_run(stack: Stack) -> None:
    key = stack.model.script({"error": {"status": 503, "message": "overloaded"}})
    run_id = await stack.client.start_run("flaky", key)

    events = await collect(stack, run_id)

    assert kinds(events) == ["run_failed"]
    assert "overloaded" in events[0].run_failed.error
    assert len(stack.model.server.requests_for(key)) == 3  # the agent's model_attempts, then given up
    run = await stack.client.get_run(run_id)
    assert run.state == pb.RUN_STATE_FAILED
    assert "overloaded" in run.error


async def test_a_rate_limited_model_is_retried_after_the_delay_it_asks_for(stack: Stack) -> None:
    limited = {"error": {"status": 429, "message": "slow down", "retry_after": 2}}
    key = stack.model.script(limited, limited, {"text": "finally"})
    run_id = await stack.client.start_run("flaky", key)

    events = await collect(stack, run_id)

    assert events[-1].run_completed.output == "finally"
    first, second, third = stack.model.server.request_times_for(key)
    # Retry-After (2 s) wins over the policy's first intervals (1 s, then 2 s): a burst of 429s does not fail the run.
    assert second - first >= 2 and third - second >= 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_a_request_the_model_rejects_is_not_retried(stack: Stack, status: int) -> None:
    key = stack.model.script({"error": {"status": status, "message": "no"}})
    run_id = await stack.client.start_run("flaky", key)

    events = await collect(stack, run_id)

    assert kinds(events) == ["run_failed"]
    assert len(stack.model.server.requests_for(key)) == 1


@pytest.mark.parametrize("status", [408, 409, 500, 502])
async def test_a_model_that_cannot_answer_now_is_retried(stack: Stack, status: int) -> None:
    key = stack.model.script({"error": {"status": status, "message": "not now"}}, {"text": "now"})
    run_id = await stack.client.start_run("flaky", key)

    events = await collect(stack, run_id)

    assert events[-1].run_completed.output == "now"
    assert len(stack.model.server.requests_for(key)) == 2


async def test_a_retried_model_call_does_not_repeat_streamed_text(stack: Stack) -> None:
    key = stack.model.script({"chunks": WORDS, "disconnect_after_chunks": 10}, {"chunks": WORDS})
    run_id = await stack.client.start_run("assistant", key)

    events = await collect(stack, run_id)

    assert len(stack.model.server.requests_for(key)) == 2
    assert text_of(events) == TEXT
    assert events[-1].run_completed.output == TEXT
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def test_list_runs_pages_through_this_deployments_runs(stack: Stack) -> None:
    run_ids = {await stack.client.start_run("assistant", f"list {i}") for i in range(3)}
    for run_id in run_ids:
        await collect(stack, run_id)

    seen: list[pb.Run] = []
    for _ in range(100):  # visibility is eventually consistent
        seen, token = [], ""
        while True:
            page = await stack.client.list_runs(page_size=2, page_token=token)
            assert len(page.runs) <= 2
            seen += page.runs
            token = page.next_page_token
            if not token:
                break
        if {r.run_id for r in seen} == run_ids and all(r.state == pb.RUN_STATE_COMPLETED for r in seen):
            break
        await asyncio.sleep(0.1)
    assert {r.run_id for r in seen} == run_ids
    assert all(r.agent == "assistant" for r in seen)


async def test_a_watcher_learns_of_a_run_that_ended_without_a_terminal_event(stack: Stack) -> None:
    # Terminated by an operator in Temporal: the workflow publishes nothing; the relay asks Temporal about quiet runs.
    key = stack.model.script({"tool_calls": [{"name": "echo", "arguments": {"text": "x"}}]})
    run_id = await stack.client.start_run("patient", key)
    events: list[pb.RunEvent] = []
    async for event in stack.client.stream_run(run_id):
        events.append(event)
        if event.HasField("approval_requested"):
            await stack.temporal.get_workflow_handle(run_id).terminate("operator")

    assert events[-1].run_failed.error == "the run was terminated"
    assert events[-1].sequence == events[-2].sequence + 1
