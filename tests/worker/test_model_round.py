"""The model round that answers ends the run itself: run_completed right after the last token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import openai
from temporalio.testing import ActivityEnvironment

from agentrun.v1 import agent_service_pb2 as pb
from shared import events
from shared.agents import load_agents
from shared.contract import CallModelInput, RunEnd, RunOutcome, Usage
from shared.conversations import ConversationStore
from shared.run_stream import RunStreamWriter
from shared.transcripts import TranscriptStore
from tests.agent_service.test_runs import collect
from tests.conftest import AGENTS_FILE, Stack
from worker.activities import RunActivities
from worker.tools import default_registry


async def test_the_answering_round_publishes_the_end_with_the_whole_runs_usage(stack: Stack) -> None:
    calculator = {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2+3"}}]}
    key = stack.model.script(calculator, {"text": "It is 5."})  # the second round answers
    run_id = await stack.client.start_run("tools", f"{key} add")
    streamed = await collect(stack, run_id)
    handle = stack.temporal.get_workflow_handle(run_id)
    await handle.result()

    history = await handle.fetch_history()
    # No local activity after the last model round: the workflow did not publish the end itself.
    markers = [
        e.marker_recorded_event_attributes.marker_name
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
    ]
    assert "core_local_activity" not in markers and markers  # the run-timeout patch's marker is there
    done = streamed[-1].run_completed
    assert done.output == "It is 5."
    run = await stack.client.get_run(run_id)  # Temporal's record, now that the workflow has completed
    assert run.state == pb.RUN_STATE_COMPLETED
    assert run.usage == done.usage and done.usage.completion_tokens > 0
    assert len(stack.model.server.requests_for(key)) == 2  # both rounds' usage is in the total


async def test_a_retried_round_that_had_ended_the_run_does_not_ask_the_model_again(stack: Stack) -> None:
    """The worker died after the round published run_completed and before Temporal heard of it: the retry returns
    the answer the client already has, since a second answer from the model could differ from it."""
    agent = load_agents(AGENTS_FILE)["assistant"]
    key = stack.model.script({"text": "a different answer"})
    run_id = f"run-retried-{key}"
    writer = RunStreamWriter(stack.redis, stack.settings.redis_prefix, ttl_seconds=600)
    before, total = Usage(10, 2, 0, 0, 12), Usage(25, 7, 0, 0, 32)
    await earlier_events(writer, run_id)
    published = await writer.append(
        run_id,
        [
            events.text_delta("The first answer."),
            events.run_ended(RunOutcome(RunEnd.COMPLETED, output="The first answer.", usage=total)),
        ],
        floor=3,
    )
    activities = activities_on(stack, writer)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[3])
    round_input = CallModelInput(
        run_id, agent, [{"role": "user", "content": key}], after_sequence=3, round=1, usage_before=before
    )

    reply = await env.run(activities.call_model, round_input)

    assert stack.model.server.requests_for(key) == []
    assert reply.text == "The first answer."
    assert reply.ended_run == reply.last_sequence == published.last_sequence == 5
    assert reply.usage == total - before
    assert reply.message == {"role": "assistant", "content": "The first answer."}


async def test_an_answer_that_fails_the_run_leaves_the_end_to_the_workflow(stack: Stack) -> None:
    run_id = await stack.client.start_run("json", stack.model.script({"text": "not json"}))
    streamed = await collect(stack, run_id)

    assert streamed[-1].WhichOneof("kind") == "run_failed"
    assert [e.sequence for e in streamed] == list(range(1, len(streamed) + 1))


async def test_a_retried_sub_agent_round_skips_only_its_own_text_and_leaves_the_stream_open(stack: Stack) -> None:
    """A sub-agent's run shares the root's stream with its siblings: a retry of its model round continues its own
    text, and its answer goes back to its parent, so the stream gets no run_completed."""
    agent = load_agents(AGENTS_FILE)["researcher"]
    key = stack.model.script({"chunks": ["Half ", "of it, ", "then the rest."]})
    run_id = f"run-sub-{key}"
    writer = RunStreamWriter(stack.redis, stack.settings.redis_prefix, ttl_seconds=600)
    path, sibling = ["planner", "researcher"], ["planner", "remote"]
    await earlier_events(writer, run_id)
    await writer.append(run_id, [events.text_delta("Half ")], floor=3, agent_path=path)
    await writer.append(run_id, [events.text_delta("Half of the sibling's")], floor=3, agent_path=sibling)
    await writer.append(run_id, [events.text_delta("of it, ")], floor=3, agent_path=path)
    activities = activities_on(stack, writer)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[6])
    round_input = CallModelInput(
        run_id, agent, [{"role": "user", "content": key}], 3, agent_path=path, sub_run=f"{run_id}/call_1"
    )

    reply = await env.run(activities.call_model, round_input)

    streamed = await writer.read_after(run_id, 3)
    assert [e.sequence for e in streamed] == [4, 5, 6, 7]
    assert streamed[-1].text_delta.text == "then the rest." and list(streamed[-1].agent_path) == path
    assert (reply.text, reply.ended_run, reply.last_sequence) == ("Half of it, then the rest.", 0, 7)


async def test_model_calls_go_over_one_kept_alive_connection(stack: Stack) -> None:
    agent = load_agents(AGENTS_FILE)["assistant"]
    key = stack.model.script({"chunks": ["one ", "reply"]})
    writer = RunStreamWriter(stack.redis, stack.settings.redis_prefix, ttl_seconds=600)
    async with (
        counting_proxy(stack.model.base_url) as (base_url, connections),
        openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0) as llm,
    ):
        activities = activities_on(stack, writer, llm)
        for n in range(3):
            round_input = CallModelInput(f"run-{n}-{key}", agent, [{"role": "user", "content": key}], 0)
            assert (await ActivityEnvironment().run(activities.call_model, round_input)).text == "one reply"

    assert len(stack.model.server.requests_for(key)) == 3
    assert connections == [1]  # each reply read to its end hands its connection to the next call


async def test_an_endpoint_that_keeps_its_reply_open_after_done_does_not_hold_the_round(stack: Stack) -> None:
    agent = load_agents(AGENTS_FILE)["assistant"]
    writer = RunStreamWriter(stack.redis, stack.settings.redis_prefix, ttl_seconds=600)
    events = [{"choices": [{"index": 0, "delta": {"content": "whole"}, "finish_reason": "stop"}]}, "[DONE]"]
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()

    async def reply_and_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        headers = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(headers + b"%x\r\n%s\r\n" % (len(body), body))  # and never the last chunk
        await reader.read()  # until the client gives up on the connection
        writer.close()

    server = await asyncio.start_server(reply_and_hang, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with server, openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0) as llm:
        round_input = CallModelInput(f"run-hung-{uuid.uuid4().hex}", agent, [{"role": "user", "content": "hi"}], 0)
        reply = await asyncio.wait_for(
            ActivityEnvironment().run(activities_on(stack, writer, llm).call_model, round_input), 5
        )

    assert reply.text == "whole"


@contextlib.asynccontextmanager
async def counting_proxy(base_url: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP proxy to the server at ``base_url``; yields its own base URL and a one-item list: the connections it
    has accepted."""
    upstream = urlsplit(base_url)
    accepted = [0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        server_reader, server_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(
            pipe(client_reader, server_writer), pipe(server_reader, client_writer), return_exceptions=True
        )

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    try:
        yield upstream._replace(netloc=f"127.0.0.1:{server.sockets[0].getsockname()[1]}").geturl(), accepted
    finally:
        server.close()


def activities_on(stack: Stack, writer: RunStreamWriter, llm: openai.AsyncOpenAI | None = None) -> RunActivities:
    """The worker's activities, publishing through ``writer`` (and asking ``llm``, else the stack's), outside a
    worker."""
    return RunActivities(
        llm or stack.llm,
        writer,
        default_registry(stack.settings.tool_modules),
        ConversationStore(stack.redis, stack.settings.redis_prefix),
        TranscriptStore(stack.redis, stack.settings.redis_prefix),
    )


async def earlier_events(writer: RunStreamWriter, run_id: str) -> None:
    """The run's first three events, published before the round under test."""
    await writer.append(run_id, [events.text_delta("earlier") for _ in range(3)], floor=0)
