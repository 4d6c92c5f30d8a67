"""Activities of an agent run: every side effect the workflow needs happens here."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import jsonschema
import openai
from google.protobuf import json_format
from openai.types.chat import ChatCompletionMessageParam
from temporalio import activity
from temporalio.exceptions import ApplicationError

from agentrun.v1 import agent_service_pb2 as pb
from worker.agents import AgentConfig
from worker.conversations import ConversationStore
from worker.run_stream import RunStreamWriter, new_event
from worker.tools import ToolContext, ToolError, ToolRegistry

# How often a running activity tells Temporal it is alive. Cancellation reaches
# the activity through the answer to a heartbeat, so this also bounds how long a
# cancelled run keeps streaming.
HEARTBEAT_INTERVAL_SECONDS = 0.5

FINAL_ROUND_NOTE = (
    "You have used all {rounds} steps this run allows. Answer now with what you have; tools are no longer available."
)
# Stands in for a tool result that a run never recorded (it ended during the
# call), so that the history sent to the model stays well-formed.
MISSING_RESULT = "No result: the run ended before this tool call finished."


@dataclass
class Usage:
    """Tokens spent by model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.total_tokens + other.total_tokens,
        )

    def to_proto(self) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_tokens=self.reasoning_tokens,
            total_tokens=self.total_tokens,
        )


@dataclass
class CallModelInput:
    """One model round of a run.

    ``messages`` are the run's own messages so far (its user message first);
    ``after_sequence`` is the last event the workflow knows was published.
    """

    run_id: str
    agent: AgentConfig
    messages: list[dict[str, Any]]
    after_sequence: int
    round: int = 0
    conversation_id: str = ""
    # The last round the agent may take: the model is told to answer without tools.
    final_round: bool = False
    # The agents from the run's root to the one calling, stamped on every event.
    agent_path: list[str] = field(default_factory=list)


@dataclass
class ToolCallRequest:
    """A tool call the model made; ``error`` is set when it cannot run (unknown tool, bad arguments)."""

    call_id: str
    name: str
    arguments: str
    error: str = ""
    needs_approval: bool = False


@dataclass
class ModelReply:
    """What the model answered, what it cost, and the last event sequence the round published."""

    text: str
    usage: Usage
    last_sequence: int
    # The assistant message to add to the run's messages.
    message: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    # With an output schema: the parsed answer, or why it does not fit the schema.
    structured_output: Any = None
    output_error: str = ""


@dataclass
class PublishInput:
    """A terminal event for the run's stream, described without protobuf types."""

    run_id: str
    after_sequence: int
    kind: str  # "run_completed", "run_failed" or "run_cancelled"
    output: str = ""
    usage: Usage = field(default_factory=Usage)
    error: str = ""
    reason: str = ""
    structured_output: Any = None
    # The run's conversation, released for the next run once the run has ended.
    conversation_id: str = ""
    agent_path: list[str] = field(default_factory=list)


@dataclass
class PublishEventsInput:
    """Events from the workflow, each a dict in the protobuf JSON form of a RunEvent's kind.

    ``once`` names the batch so that a retried publish adds nothing.
    """

    run_id: str
    after_sequence: int
    events: list[dict[str, Any]]
    once: str
    agent_path: list[str] = field(default_factory=list)


@dataclass
class RunToolInput:
    """One tool call to execute."""

    run_id: str
    call_id: str
    name: str
    arguments: str
    after_sequence: int
    agent_path: list[str] = field(default_factory=list)


@dataclass
class ToolOutcome:
    """How a tool call ended: "completed" with a result, or "failed" with an error for the model."""

    status: str
    result: str = ""
    error: str = ""
    last_sequence: int = 0


# Client errors that another attempt cannot fix.
_PERMANENT_MODEL_ERRORS = (
    openai.BadRequestError,
    openai.AuthenticationError,
    openai.PermissionDeniedError,
    openai.NotFoundError,
    openai.UnprocessableEntityError,
)


class _Publisher:
    """Publishes events in order while the model keeps streaming.

    The first event goes out at once; events produced while a write is in flight
    are sent together by the next write, so a fast model costs few Redis calls
    and a slow one is never held back.
    """

    def __init__(self, writer: RunStreamWriter, run_id: str, after_sequence: int, agent_path: list[str]) -> None:
        self._writer = writer
        self._run_id = run_id
        self._agent_path = agent_path
        self.last_sequence = after_sequence
        self.closed = False
        self._pending: list[pb.RunEvent] = []
        self._wake = asyncio.Event()
        self._done = False
        self._task = asyncio.create_task(self._flush_forever())

    def add(self, event: pb.RunEvent) -> None:
        if self._task.done():
            self._task.result()  # re-raises a failed write
        self._pending.append(event)
        self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                result = await self._writer.append(
                    self._run_id, batch, floor=self.last_sequence, agent_path=self._agent_path
                )
                self.last_sequence, self.closed = result.last_sequence, result.closed
            if self._done and not self._pending:
                return

    async def close(self) -> None:
        self._done = True
        self._wake.set()
        await self._task

    async def abandon(self) -> None:
        """Drops unsent events but lets a write in flight finish, so a retry knows exactly what was published."""
        self._pending.clear()
        self._done = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task


@contextlib.asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeats while the block runs, even when it waits on a silent model or a slow tool."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


class RunActivities:
    """Activities bound to the worker's clients (model, Redis) and its tools."""

    def __init__(
        self,
        model: openai.AsyncOpenAI,
        stream: RunStreamWriter,
        agents: dict[str, AgentConfig],
        tools: ToolRegistry,
        conversations: ConversationStore,
    ) -> None:
        self._model = model
        self._stream = stream
        self._agents = agents
        self._tools = tools
        self._conversations = conversations

    def _check_agent(self, agent: AgentConfig) -> None:
        mine = self._agents.get(agent.name)
        if mine is None or mine.fingerprint() != agent.fingerprint():
            ours = mine.fingerprint() if mine else "missing"
            raise ApplicationError(
                f"agent {agent.name!r} is configured differently on the server (fingerprint "
                f"{agent.fingerprint()}) and on this worker ({ours}); deploy the same agents file to both",
                type="AgentConfigMismatch",
                non_retryable=True,
            )

    async def _model_messages(self, input: CallModelInput) -> list[dict[str, Any]]:
        agent = input.agent
        if input.conversation_id:
            # Saving first means the history the model sees is exactly what the
            # conversation keeps, and a run that fails later has still saved its turn.
            await self._conversations.append(
                input.conversation_id, input.run_id, input.messages, ttl_seconds=agent.history_ttl_seconds
            )
            history = await self._conversations.window(input.conversation_id, max_messages=agent.history_max_messages)
        else:
            history = input.messages
        messages = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
        messages += _with_all_tool_results(history)
        if input.final_round:
            messages.append({"role": "system", "content": FINAL_ROUND_NOTE.format(rounds=agent.max_iterations)})
        return messages

    @activity.defn
    async def call_model(self, input: CallModelInput) -> ModelReply:
        """Streams one model reply, publishing each text delta to the run's stream as it arrives."""
        self._check_agent(input.agent)
        agent = input.agent
        messages = await self._model_messages(input)
        # A retry must not repeat text that an earlier attempt already streamed:
        # what that attempt published is skipped as long as the new reply agrees.
        already_sent = ""
        if activity.info().attempt > 1:
            earlier = await self._stream.read_after(input.run_id, input.after_sequence)
            already_sent = "".join(e.text_delta.text for e in earlier if e.HasField("text_delta"))
        offer_tools = bool(agent.tools) and not input.final_round
        publisher = _Publisher(self._stream, input.run_id, input.after_sequence, input.agent_path)
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage = Usage()
        position = 0
        try:
            async with _heartbeating():
                response = await self._model.chat.completions.create(
                    model=agent.model,
                    messages=cast("list[ChatCompletionMessageParam]", messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    **_request_options(agent, self._tools.specs(agent.tools) if offer_tools else []),
                )
                async for chunk in response:
                    if chunk.usage is not None:
                        usage = _usage_from(chunk.usage)
                    for choice in chunk.choices:
                        for piece in choice.delta.tool_calls or []:
                            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                            call["id"] = piece.id or call["id"]
                            if piece.function is not None:
                                call["name"] += piece.function.name or ""
                                call["arguments"] += piece.function.arguments or ""
                        delta = choice.delta.content
                        if not delta:
                            continue
                        text.append(delta)
                        fresh = delta
                        if position < len(already_sent):
                            overlap = already_sent[position : position + len(delta)]
                            if delta.startswith(overlap):
                                fresh = delta[len(overlap) :]
                            else:
                                already_sent = ""  # the new reply differs: stream it as it comes
                        position += len(delta)
                        if fresh:
                            publisher.add(new_event(text_delta=pb.TextDelta(text=fresh)))
                            # Let the publisher send now, even when more chunks are already buffered.
                            await asyncio.sleep(0)
                    if publisher.closed:
                        break  # the run has ended (cancelled); nobody reads further deltas
                await publisher.close()
        except _PERMANENT_MODEL_ERRORS as err:
            await publisher.abandon()
            raise ApplicationError(
                f"model rejected the request: {err}", type=type(err).__name__, non_retryable=True
            ) from err
        except BaseException:
            await publisher.abandon()
            raise
        reply = ModelReply(text="".join(text), usage=usage, last_sequence=publisher.last_sequence)
        reply.tool_calls = [self._inspect(agent, call) for _, call in sorted(calls.items())]
        reply.message = _assistant_message(reply.text, reply.tool_calls)
        if reply.tool_calls:
            started = [
                new_event(
                    tool_call_started=pb.ToolCallStarted(call_id=c.call_id, tool_name=c.name, arguments=c.arguments)
                )
                for c in reply.tool_calls
            ]
            result = await self._stream.append(
                input.run_id,
                started,
                floor=reply.last_sequence,
                agent_path=input.agent_path,
                once=f"started:{input.round}",
            )
            reply.last_sequence = result.last_sequence
        elif agent.output_schema is not None:
            reply.structured_output, reply.output_error = _parse_answer(reply.text, agent.output_schema)
        if input.conversation_id:
            await self._conversations.append(
                input.conversation_id,
                input.run_id,
                [*input.messages, reply.message],
                ttl_seconds=agent.history_ttl_seconds,
            )
        return reply

    def _inspect(self, agent: AgentConfig, call: dict[str, Any]) -> ToolCallRequest:
        """Checks a call before anything runs: is the tool available, are the arguments valid, is approval needed?"""
        request = ToolCallRequest(call_id=call["id"], name=call["name"], arguments=call["arguments"])
        if request.name not in agent.tools:
            available = ", ".join(agent.tools) or "none"
            request.error = f"unknown tool {request.name!r}; available tools: {available}"
            return request
        try:
            self._tools.parse_arguments(request.name, request.arguments)
        except ToolError as err:
            request.error = str(err)
            return request
        flagged = self._tools.get(request.name).requires_approval
        request.needs_approval = agent.approval.requires_approval(request.name, flagged_by_tool=flagged)
        return request

    @activity.defn
    async def run_tool(self, input: RunToolInput) -> ToolOutcome:
        """Runs one tool call; an error in the tool becomes an error result for the model, not a retry."""
        # The key is the same on every attempt of this call, so a tool with side
        # effects can recognise a retry of work it has already done.
        context = ToolContext(
            run_id=input.run_id,
            call_id=input.call_id,
            idempotency_key=f"{input.run_id}:{input.call_id}",
        )
        try:
            async with _heartbeating():
                arguments = self._tools.parse_arguments(input.name, input.arguments)
                outcome = ToolOutcome("completed", result=await self._tools.run(input.name, arguments, context))
        except ToolError as err:
            outcome = ToolOutcome("failed", error=str(err))
        except Exception as err:
            outcome = ToolOutcome("failed", error=f"{type(err).__name__}: {err}")
        finished = pb.ToolCallFinished(
            call_id=input.call_id,
            tool_name=input.name,
            status=pb.TOOL_CALL_STATUS_COMPLETED if outcome.status == "completed" else pb.TOOL_CALL_STATUS_FAILED,
            result=outcome.result,
            error=outcome.error,
        )
        published = await self._stream.append(
            input.run_id,
            [new_event(tool_call_finished=finished)],
            floor=input.after_sequence,
            agent_path=input.agent_path,
            once=f"finished:{input.call_id}",
        )
        outcome.last_sequence = published.last_sequence
        return outcome

    @activity.defn
    async def publish_events(self, input: PublishEventsInput) -> int:
        """Publishes events that the workflow itself produces; returns the last sequence."""
        events = []
        for spec in input.events:
            event = json_format.ParseDict(spec, pb.RunEvent())
            event.time.GetCurrentTime()
            events.append(event)
        result = await self._stream.append(
            input.run_id, events, floor=input.after_sequence, agent_path=input.agent_path, once=input.once
        )
        return result.last_sequence

    @activity.defn
    async def publish_terminal_event(self, input: PublishInput) -> int:
        """Publishes the run's last event and frees its conversation; returns the event's sequence."""
        if input.kind == "run_completed":
            completed = pb.RunCompleted(output=input.output, usage=input.usage.to_proto())
            if input.structured_output is not None:
                json_format.ParseDict(input.structured_output, completed.structured_output)
            event = new_event(run_completed=completed)
        elif input.kind == "run_failed":
            event = new_event(run_failed=pb.RunFailed(error=input.error))
        elif input.kind == "run_cancelled":
            event = new_event(run_cancelled=pb.RunCancelled(reason=input.reason))
        else:
            raise ApplicationError(f"unknown terminal event kind {input.kind!r}", non_retryable=True)
        result = await self._stream.append(
            input.run_id, [event], floor=input.after_sequence, agent_path=input.agent_path
        )
        if input.conversation_id:
            await self._conversations.release_active_run(input.conversation_id, input.run_id)
        return result.last_sequence


def _request_options(agent: AgentConfig, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent's sampling settings, tools and answer format, leaving out what it does not set."""
    options: dict[str, Any] = {
        "temperature": agent.temperature,
        "top_p": agent.top_p,
        "max_completion_tokens": agent.max_tokens,
        "reasoning_effort": agent.reasoning_effort,
        "tools": tools or None,
    }
    if agent.output_schema is not None:
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": agent.output_schema},
        }
    return {key: value for key, value in options.items() if value is not None}


def _parse_answer(text: str, schema: dict[str, Any]) -> tuple[Any, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"the answer is not valid JSON ({err})"
    try:
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as err:
        return None, f"the answer does not match the output schema: {err.message}"
    return value, ""


def _assistant_message(text: str, calls: list[ToolCallRequest]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message


def _with_all_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds a stand-in result after every tool call that has none, which model APIs reject."""
    answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
    complete: list[dict[str, Any]] = []
    unanswered: list[str] = []

    def close_turn() -> None:
        complete.extend({"role": "tool", "tool_call_id": c, "content": MISSING_RESULT} for c in unanswered)
        unanswered.clear()

    for message in messages:
        if message.get("role") != "tool":
            close_turn()
        complete.append(message)
        unanswered += [c["id"] for c in message.get("tool_calls") or [] if c["id"] not in answered]
    close_turn()
    return complete


def _usage_from(usage: object) -> Usage:
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return Usage(
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        cached_tokens=getattr(prompt_details, "cached_tokens", 0) or 0,
        reasoning_tokens=getattr(completion_details, "reasoning_tokens", 0) or 0,
        total_tokens=getattr(usage, "total_tokens", 0) or 0,
    )
