"""Activities of an agent run: every side effect the workflow needs happens here."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import jsonschema
import openai
import redis.asyncio as redis
from openai import AsyncAPIResponse
from openai.types.chat import ChatCompletionMessageParam
from temporalio import activity
from temporalio.exceptions import ApplicationError

from agentrun.v1 import agent_service_pb2 as pb
from shared import events, telemetry
from shared.agents import AgentConfig, delegation_tool_name
from shared.contract import (
    CallModelInput,
    ErrorType,
    ModelReply,
    PublishEventsInput,
    PublishOutcomeInput,
    RunEnd,
    RunOutcome,
    RunToolInput,
    ToolCallRequest,
    ToolCallStatus,
    ToolOutcome,
    Usage,
)
from shared.conversations import ConversationStore
from shared.run_stream import AppendResult, RunStreamWriter, writer_name
from shared.transcripts import Message, TranscriptLostError, TranscriptStore
from worker import _telemetry
from worker.tools import ToolContext, ToolError, ToolRegistry, ToolUnavailableError

# How often a running activity tells Temporal it is alive (and the last sequence it published). Cancellation reaches
# a tool, or a model call still waiting for its first token, through the answer to a heartbeat, so this bounds how
# long those take to stop; a streaming model call stops sooner, at its next append, since the cancelled workflow has
# published run_cancelled at once. Each heartbeat is a call to Temporal: at 0.5 s, 1,000 runs streaming at once made
# 7 heartbeats per run, the most of any call, and slowed every run; so 2 s.
HEARTBEAT_INTERVAL_SECONDS = 2.0

FINAL_ROUND_NOTE = (
    "You have used all {rounds} steps this run allows. Answer now with what you have; tools are no longer available."
)
# Stands in for a tool result that a run never recorded (it ended during the
# call), so that the history sent to the model stays well-formed.
MISSING_RESULT = "No result: the run ended before this tool call finished."

# How long the end of a model reply's body may take after its [DONE] (the openai client's own bound), before its
# connection is closed rather than kept alive.
DRAIN_SECONDS = 0.1
# A run's transcript outlives the run by this much: every round renews it, and no run lives longer than its timeout.
TRANSCRIPT_TTL_MARGIN_SECONDS = 60
# Statuses with which a model endpoint says "not now" rather than "never": retried, after Retry-After if given.
_RETRYABLE_MODEL_STATUSES = frozenset({408, 409, 429})
# The arguments of a delegation tool: the sub-agent sees only its task, not the conversation that led to it.
DELEGATION_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task": {
            "type": "string",
            "minLength": 1,
            "description": "The task, with all it takes to do it: the agent sees nothing else of this conversation.",
        }
    },
    "required": ["task"],
    "additionalProperties": False,
}


@dataclass
class _Resumed:
    """Where a model call's text continues: after ``floor``, skipping text that an earlier attempt published."""

    floor: int
    already_sent: str = ""
    # An earlier attempt ended the run with its reply (this run_completed event) before Temporal heard of it.
    answer: pb.RunEvent | None = None


class _TextPublisher:
    """Publishes a reply's text to the run's stream while the model keeps streaming.

    The first text goes out at once; text that arrives while a write is in flight is sent as one event by the
    next write, so a fast model costs few Redis calls and a slow one is never held back. A retried model call
    must not repeat text that an earlier attempt already published: ``already_sent`` is skipped for as long as
    the new reply agrees with it.
    """

    def __init__(self, writer: RunStreamWriter, input: CallModelInput, resumed: _Resumed) -> None:
        self._writer = writer
        self._run_id = input.run_id
        self._agent_path = input.agent_path
        # Each batch is named, so that Redis adds nothing when a lost reply makes the client send it again.
        self._name = writer_name(input.sub_run, f"model:{input.round}")
        self._batch_prefix = f"{activity.info().attempt}:"
        self._batches = 0
        self._already_sent = resumed.already_sent
        self._position = 0
        self.last_sequence = resumed.floor
        # The run has ended (it was cancelled): nobody reads further text.
        self.closed = False
        self._pending: list[str] = []
        self._writing = False
        self._wake = asyncio.Event()
        self._done = False
        self._task = asyncio.create_task(self._flush_forever())

    def add(self, text: str) -> bool:
        """Queues the reply's next text; returns whether any of it is new to the stream."""
        if self._task.done():
            self._task.result()  # re-raises a failed write
        fresh = self._skip_already_sent(text)
        if fresh:
            self._pending.append(fresh)
            self._wake.set()
        return bool(fresh)

    @property
    def idle(self) -> bool:
        """No write is in flight: text added now goes out at once."""
        return not self._writing

    def _skip_already_sent(self, text: str) -> str:
        start, self._position = self._position, self._position + len(text)
        if start >= len(self._already_sent):
            return text
        overlap = self._already_sent[start : start + len(text)]
        if text.startswith(overlap):
            return text[len(overlap) :]
        self._already_sent = ""  # the new reply differs: stream it as it comes
        return text

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending:
                text, self._pending = "".join(self._pending), []
                self._batches += 1
                self._writing = True
                try:
                    result = await self._writer.append(
                        self._run_id,
                        [events.text_delta(text)],
                        floor=self.last_sequence,
                        agent_path=self._agent_path,
                        writer=self._name,
                        batch=f"{self._batch_prefix}{self._batches}",
                    )
                finally:
                    self._writing = False
                self.last_sequence, self.closed = result.last_sequence, result.closed
            if self._done and not self._pending:
                return

    async def close(self) -> None:
        """Sends what is queued and waits until it is written."""
        self._done = True
        self._wake.set()
        await self._task

    async def abandon(self) -> None:
        """Drops unsent text but lets a write in flight finish, so a retry knows exactly what was published."""
        self._pending.clear()
        self._done = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task


class _StreamedReply:
    """Assembles a streamed chat completion: its text, its tool calls and its usage."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.usage = Usage()
        self._calls: dict[int, dict[str, str]] = {}
        # What the reply says about itself, for its trace.
        self.model = ""
        self.id = ""
        self.finish_reasons: list[str] = []

    def add(self, chunk: dict[str, Any]) -> str:
        """Takes in one chunk (a ``chat.completion.chunk`` as JSON); returns its text."""
        if chunk.get("usage"):
            self.usage = _usage_from(chunk["usage"])
        if not self.model:
            self.model, self.id = chunk.get("model") or "", chunk.get("id") or ""
        text = ""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("finish_reason"):
                self.finish_reasons.append(choice["finish_reason"])
            for piece in delta.get("tool_calls") or ():
                call = self._calls.setdefault(piece.get("index", 0), {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.get("id") or call["id"]
                function = piece.get("function") or {}
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
            text += delta.get("content") or ""
        self.text.append(text)
        return text

    def calls(self) -> list[ToolCallRequest]:
        return [ToolCallRequest(c["id"], c["name"], c["arguments"]) for _, c in sorted(self._calls.items())]


@contextlib.asynccontextmanager
async def _heartbeating(published: Callable[[], int] | None = None) -> AsyncIterator[None]:
    """Heartbeats while the block runs, even when it waits on a silent model or a slow tool.

    ``published`` gives the last sequence published so far: it goes with each heartbeat, so that the next attempt,
    or the workflow after a failure, knows a floor for the run's sequence numbers even if Redis lost the stream.
    """

    async def beat() -> None:
        while True:
            # The first one an interval in, not at once: it would tell Temporal nothing new, and every call shorter
            # than the interval (most model rounds, most tools) would pay a Temporal call for it.
            await asyncio.sleep(HEARTBEAT_INTERVAL_SECONDS)
            activity.heartbeat(*([published()] if published else []))

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
        tools: ToolRegistry,
        conversations: ConversationStore,
        transcripts: TranscriptStore,
    ) -> None:
        self._model = model
        self._stream = stream
        self._tools = tools
        self._conversations = conversations
        self._transcripts = transcripts
        self._base_url = str(model.base_url)

    @activity.defn
    async def call_model(self, input: CallModelInput) -> ModelReply:
        """Streams one model reply, publishing its text to the run's stream as it arrives."""
        call = _telemetry.ModelCall(input.agent, self._base_url, input.round)
        with call.span() as span:
            return await self._call_model(input, call, span)

    async def _call_model(self, input: CallModelInput, call: _telemetry.ModelCall, span: Any) -> ModelReply:
        agent = input.agent
        tool_names = self._tools.agent_tools(agent, input.tool_digests)
        tool_digests = self._check_tools(agent, tool_names, input.tool_digests)
        resumed = await self._resume(input)
        if resumed.answer is not None:
            return await self._answered_before(input, resumed.answer, tool_digests)
        publisher = _TextPublisher(self._stream, input, resumed)
        streamed = _StreamedReply()
        # A round that sends the whole transcript (a run's first) has it in its input: the model is asked without
        # waiting for Redis, which stores it only for a round that may follow (an answer that ends the run needs
        # no transcript).
        whole = input.first_message == 0 and not input.conversation_id
        try:
            transcript = input.messages if whole else await self._transcript(input)
            messages = await self._model_messages(input, transcript)
            async with _heartbeating(lambda: publisher.last_sequence):
                # The raw stream: the client's typed chunks cost about 100 us of CPU each, five times the rest of
                # a token's way to the client (see bench/); the JSON is read here instead.
                async with self._model.chat.completions.with_streaming_response.create(
                    model=agent.model,
                    messages=cast("list[ChatCompletionMessageParam]", messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    **_request_options(agent, self._offered_tools(input, tool_names)),
                ) as response:
                    async for chunk in _chunks(response):
                        if not call.first_chunk_at:
                            call.first_chunk_at = time.perf_counter()
                        if publisher.add(streamed.add(chunk)) and publisher.idle:
                            # Let the publisher send now, even when more chunks are already buffered; while a
                            # write is in flight, the text waits for the next one anyway.
                            await asyncio.sleep(0)
                        if publisher.closed:
                            break
                await publisher.close()
            if whole and (streamed.calls() or input.sub_run or agent.output_schema is not None):
                await self._transcript(input)
        except asyncio.CancelledError:
            await publisher.abandon()
            raise
        except Exception as err:
            await publisher.abandon()
            raise _failure(err, publisher.last_sequence) from err
        reply = ModelReply(
            text="".join(streamed.text),
            usage=streamed.usage,
            last_sequence=publisher.last_sequence,
            tool_digests=tool_digests,
        )
        await self._complete_reply(input, reply, streamed.calls(), tool_names, transcript)
        call.finish(
            span,
            reply.usage,
            response_model=streamed.model,
            response_id=streamed.id,
            finish_reasons=streamed.finish_reasons,
            messages=messages,
            text=reply.text,
            calls=reply.tool_calls,
        )
        if not reply.tool_calls and not reply.output_error and not input.sub_run:
            # The reply is the run's answer: end the run here, so the client has run_completed right after the last
            # token instead of after another workflow task and a Temporal round trip.
            outcome = RunOutcome(
                RunEnd.COMPLETED,
                output=reply.text,
                usage=input.usage_before + reply.usage,
                structured_output=reply.structured_output,
            )
            end = await self._end_run(
                PublishOutcomeInput(input.run_id, reply.last_sequence, outcome, input.conversation_id, input.agent_path)
            )
            if not end.closed:  # else the run had already ended another way (cancelled): the workflow says how
                reply.ended_run = reply.last_sequence = end.last_sequence
        return reply

    async def _answered_before(
        self, input: CallModelInput, answer: pb.RunEvent, tool_digests: dict[str, str]
    ) -> ModelReply:
        """The reply of an earlier attempt that ended the run with it: the model is not asked again, since its
        answer may differ from the one the client has."""
        outcome = events.outcome_of(answer)
        if input.conversation_id:
            await self._conversations.release_active_run(input.conversation_id, input.run_id)
        return ModelReply(
            text=outcome.output,
            usage=outcome.usage - input.usage_before,
            last_sequence=answer.sequence,
            message=_assistant_message(outcome.output, []),
            structured_output=outcome.structured_output,
            tool_digests=tool_digests,
            ended_run=answer.sequence,
        )

    async def _end_run(self, end: PublishOutcomeInput) -> AppendResult:
        """Publishes the run's terminal event, then frees its conversation for the next run."""
        result = await self._stream.append(
            end.run_id, [events.run_ended(end.outcome)], floor=end.after_sequence, agent_path=end.agent_path
        )
        if end.conversation_id:
            await self._conversations.release_active_run(end.conversation_id, end.run_id)
        await self._transcripts.delete(end.run_id)
        if not result.closed:  # this append ended the run (a retry, or a run ended otherwise, adds nothing)
            telemetry.instruments().runs_ended.add(1, {"agentrun.run.outcome": end.outcome.end.removeprefix("run_")})
        return result

    def _check_tools(self, agent: AgentConfig, names: list[str], snapshot: dict[str, str]) -> dict[str, str]:
        """The digests of the agent's tools (``names``) here; refuses a run whose snapshot needs tools that this
        worker lacks or has in another version (``snapshot`` is empty in a run's first round). An MCP tool that
        its server dropped or changed since the run started is refused the same way."""
        missing = [name for name in names if not self._tools.has(name)]
        digests = {name: self._tools.get(name).digest() for name in names if name not in missing}
        changed = [name for name, digest in snapshot.items() if name in digests and digests[name] != digest]
        if missing or changed:
            problems = [f"it lacks tool {name!r}" for name in missing]
            problems += [f"its tool {name!r} takes other arguments than when the run started" for name in changed]
            raise ApplicationError(
                f"this worker cannot run agent {agent.name!r} as the run's snapshot needs: {'; '.join(problems)}",
                type=ErrorType.SNAPSHOT_UNSUPPORTED,
                non_retryable=True,
            )
        return digests

    async def _resume(self, input: CallModelInput) -> _Resumed:
        """Where a model call continues the run's stream: after what earlier attempts of it published."""
        info = activity.info()
        if info.attempt == 1:
            return _Resumed(floor=input.after_sequence)
        published = [d for d in info.heartbeat_details if isinstance(d, int)]
        floor = max([input.after_sequence, *published])
        stored = await self._stream.last_sequence(input.run_id)
        if stored < floor:
            # Redis lost events that an earlier attempt published, and this attempt cannot know how many it published
            # after its last heartbeat: the stream's next append jumps far past the floor (run_stream's
            # LOST_SEQUENCE_JUMP).
            return _Resumed(floor=floor)
        earlier = await self._stream.read_after(input.run_id, input.after_sequence)
        if input.sub_run:
            # The root's stream has other runs' events too: a sibling sub-agent's text is not this call's. (Two
            # sub-agent runs of one agent at once share a path; a retry may then repeat text, but never a number.)
            earlier = [event for event in earlier if list(event.agent_path) == input.agent_path]
        text = "".join(event.text_delta.text for event in earlier if event.HasField("text_delta"))
        # A sub-agent's answer never ends the stream; the run_completed there is the root's.
        ended = earlier and earlier[-1].HasField("run_completed") and not input.sub_run
        answer = earlier[-1] if ended else None
        return _Resumed(floor=max(floor, stored), already_sent=text, answer=answer)

    async def _transcript(self, input: CallModelInput) -> list[Message]:
        """The run's messages so far: the round's new ones written to the run's transcript, and the whole read back.

        A transcript that Redis lost is the workflow's to send again (it has every message): not retried here.
        """
        ttl = int(input.agent.run_timeout_seconds()) + TRANSCRIPT_TTL_MARGIN_SECONDS
        # A sub-agent's run shares its root's run id (and stream), not its transcript.
        owner = input.sub_run or input.run_id
        try:
            return await self._transcripts.write(owner, input.first_message, input.messages, ttl_seconds=ttl)
        except TranscriptLostError as err:
            raise ApplicationError(str(err), type=ErrorType.TRANSCRIPT_LOST, non_retryable=True) from None

    async def _model_messages(self, input: CallModelInput, transcript: list[Message]) -> list[Message]:
        agent = input.agent
        if input.conversation_id:
            # Saving first means the history the model sees is exactly what the
            # conversation keeps, and a run that fails later has still saved its turn.
            await self._conversations.append(
                input.conversation_id, input.run_id, transcript, ttl_seconds=agent.history_ttl_seconds
            )
            history = await self._conversations.window(input.conversation_id, max_messages=agent.history_max_messages)
        else:
            history = transcript
        messages = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
        messages += _with_all_tool_results(history)
        if input.final_round:
            messages.append({"role": "system", "content": FINAL_ROUND_NOTE.format(rounds=agent.max_iterations)})
        return messages

    async def _complete_reply(
        self,
        input: CallModelInput,
        reply: ModelReply,
        calls: list[ToolCallRequest],
        tool_names: list[str],
        transcript: list[Message],
    ) -> None:
        """Checks the reply's tool calls or its structured answer, announces the calls, and saves the turn."""
        agent = input.agent
        reply.tool_calls = [self._inspect(input, tool_names, call) for call in calls]
        reply.message = _assistant_message(reply.text, reply.tool_calls)
        if reply.tool_calls:
            result = await self._stream.append(
                input.run_id,
                [events.tool_call_started(call) for call in reply.tool_calls],
                floor=reply.last_sequence,
                agent_path=input.agent_path,
                writer=writer_name(input.sub_run, f"started:{input.round}"),
            )
            reply.last_sequence = result.last_sequence
        elif agent.output_schema is not None:
            reply.structured_output, reply.output_error = _parse_answer(reply.text, agent.output_schema)
        if input.conversation_id:
            await self._conversations.append(
                input.conversation_id,
                input.run_id,
                [*transcript, reply.message],
                ttl_seconds=agent.history_ttl_seconds,
            )

    def _offered_tools(self, input: CallModelInput, tool_names: list[str]) -> list[dict[str, Any]]:
        if input.final_round:
            return []
        delegations = [_delegation_spec(name, description) for name, description in input.sub_agents.items()]
        return self._tools.specs(tool_names) + delegations

    def _inspect(self, input: CallModelInput, tool_names: list[str], call: ToolCallRequest) -> ToolCallRequest:
        """Checks a call before anything runs: is the tool available, are the arguments valid, is approval needed?"""
        agent = input.agent
        delegations = {delegation_tool_name(name): name for name in input.sub_agents}
        if call.name in delegations:
            call.error = _delegation_error(call.arguments)
            call.sub_agent = delegations[call.name]
            # Delegating follows the agent's approval policy like any tool.
            call.needs_approval = not call.error and agent.approval.requires_approval(call.name, flagged_by_tool=False)
            return call
        if call.name not in tool_names:
            available = ", ".join([*tool_names, *delegations]) or "none"
            call.error = f"unknown tool {call.name!r}; available tools: {available}"
            return call
        try:
            self._tools.parse_arguments(call.name, call.arguments)
        except ToolError as err:
            call.error = str(err)
            return call
        flagged = self._tools.get(call.name).requires_approval
        call.needs_approval = agent.approval.requires_approval(call.name, flagged_by_tool=flagged)
        return call

    @activity.defn
    async def run_tool(self, input: RunToolInput) -> ToolOutcome:
        """Runs one tool call; an error in the tool becomes an error result for the model, not a retry."""
        if input.tool_digest and (
            not self._tools.has(input.name) or self._tools.get(input.name).digest() != input.tool_digest
        ):
            problem = "lacks it" if not self._tools.has(input.name) else "has a version with other arguments"
            raise ApplicationError(
                f"the run's snapshot needs tool {input.name!r} and this worker {problem}",
                type=ErrorType.SNAPSHOT_UNSUPPORTED,
                non_retryable=True,
            )
        # The key is the same on every attempt of this call, so a tool with side
        # effects can recognise a retry of work it has already done.
        context = ToolContext(
            run_id=input.run_id,
            call_id=input.call_id,
            # A sub-agent's run has its own id: its call ids need not be unique in the root run.
            idempotency_key=f"{input.sub_run or input.run_id}:{input.call_id}",
        )
        with _telemetry.tool_call(
            input.name, input.call_id, input.arguments, record_content=input.trace_content
        ) as span:
            try:
                async with _heartbeating():
                    arguments = self._tools.parse_arguments(input.name, input.arguments)
                    result = await self._tools.run(input.name, arguments, context)
                outcome = ToolOutcome(ToolCallStatus.COMPLETED, result=result)
            except ToolUnavailableError as err:
                if _attempts_left():
                    raise ApplicationError(str(err), type=ErrorType.TOOL_UNAVAILABLE) from None
                attempts = activity.info().attempt
                outcome = ToolOutcome(ToolCallStatus.FAILED, error=f"{err} (tried {attempts} times)")
            except ToolError as err:
                outcome = ToolOutcome(ToolCallStatus.FAILED, error=str(err))
            except Exception as err:
                outcome = ToolOutcome(ToolCallStatus.FAILED, error=f"{type(err).__name__}: {err}")
            _telemetry.tool_ended(span, input.name, outcome, record_content=input.trace_content)
        published = await self._stream.append(
            input.run_id,
            [events.tool_call_finished(input.call_id, input.name, outcome)],
            floor=input.after_sequence,
            agent_path=input.agent_path,
            writer=writer_name(input.sub_run, f"finished:{input.call_id}"),
        )
        outcome.last_sequence = published.last_sequence
        return outcome

    @activity.defn
    async def publish_events(self, input: PublishEventsInput) -> int:
        """Publishes events that the workflow itself produces; returns the last sequence."""
        for event in input.events:
            if event.approval_requested is not None:
                _telemetry.approval_requested(input.run_id, event.approval_requested)
                if input.sub_run:
                    # Before the request is out: an Approve through the root's id finds the run that waits.
                    await self._stream.route_approval(input.run_id, event.approval_requested.approval_id, input.sub_run)
            elif event.approval_decided is not None:
                _telemetry.approval_decided(input.run_id, event.approval_decided)
        result = await self._stream.append(
            input.run_id,
            [events.workflow_event(event) for event in input.events],
            floor=input.after_sequence,
            agent_path=input.agent_path,
            writer=input.once,
        )
        return result.last_sequence

    @activity.defn
    async def publish_terminal_event(self, input: PublishOutcomeInput) -> int:
        """Publishes the run's last event and frees its conversation; returns the event's sequence."""
        return (await self._end_run(input)).last_sequence


def _failure(err: Exception, published: int) -> ApplicationError:
    """The error a failed model call reports, retried as its cause means: a model endpoint's 408, 409, 429 and 5xx
    after the Retry-After it sends, its other answers not at all. The details carry the last sequence the call
    published, so that the workflow keeps numbering above it even if Redis lost the stream."""
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        if status in _RETRYABLE_MODEL_STATUSES or status >= 500:
            return ApplicationError(
                f"the model endpoint answered {status}: {err.message}",
                published,
                type=ErrorType.MODEL_UNAVAILABLE,
                next_retry_delay=_retry_after(err.response.headers),
            )
        return ApplicationError(
            f"model rejected the request: {err.message}", published, type=ErrorType.MODEL_REJECTED, non_retryable=True
        )
    if isinstance(err, openai.APIConnectionError):  # including timeouts
        return ApplicationError(
            f"the model endpoint is unreachable: {err}", published, type=ErrorType.MODEL_UNAVAILABLE
        )
    if isinstance(err, ApplicationError):
        return ApplicationError(err.message, published, type=err.type, non_retryable=err.non_retryable)
    if isinstance(err, redis.ConnectionError | redis.TimeoutError):
        return ApplicationError("Redis is unavailable", published, type=ErrorType.STREAM_UNAVAILABLE)
    return ApplicationError(f"{type(err).__name__}: {err}", published, type=type(err).__name__)


def _attempts_left() -> bool:
    """Whether Temporal will try this activity again if it fails now."""
    info = activity.info()
    policy = info.retry_policy
    return policy is None or not policy.maximum_attempts or info.attempt < policy.maximum_attempts


def _retry_after(headers: Mapping[str, str]) -> timedelta | None:
    """The delay a model endpoint asks for (``retry-after-ms``, or ``retry-after`` in seconds or as a date); the
    headers are the response's, whose names match in any case."""
    with contextlib.suppress(ValueError):
        if "retry-after-ms" in headers:
            return timedelta(milliseconds=max(0.0, float(headers["retry-after-ms"])))
        if "retry-after" in headers:
            value = headers["retry-after"]
            with contextlib.suppress(ValueError):
                return timedelta(seconds=max(0.0, float(value)))
            moment = email.utils.parsedate_to_datetime(value)
            return max(timedelta(0), moment - datetime.now(UTC))
    return None


def _delegation_spec(sub_agent: str, description: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": delegation_tool_name(sub_agent),
            "description": description or f"Hands a task to the {sub_agent} agent and returns its answer.",
            # A copy, as for every tool: a caller that edits the request cannot change the tool.
            "parameters": copy.deepcopy(DELEGATION_PARAMETERS),
        },
    }


def _delegation_error(arguments: str) -> str:
    """Why a delegation call's arguments are not a task; empty when they are."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as err:
        return f"arguments are not valid JSON ({err})"
    try:
        jsonschema.validate(value, DELEGATION_PARAMETERS, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as err:
        return f"invalid arguments: {err.message}"
    return ""


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


async def _drain(lines: AsyncIterator[str]) -> None:
    """Reads the rest of a reply's body after ``[DONE]`` (normally only its end), as the openai client does: a body
    read to its end hands its connection back to the pool, so the next call skips a connect (and a TLS handshake,
    against a hosted model). An endpoint slower than DRAIN_SECONDS to end it only loses its connection."""
    with contextlib.suppress(Exception):  # the reply is whole: nothing that happens now is the round's failure
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in lines:
                pass


async def _chunks(response: AsyncAPIResponse[Any]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat completion: the JSON of each server-sent event's data, up to ``[DONE]``.

    An error the endpoint sends in the stream (``{"error": {...}}``) is raised as the ``openai`` client does.
    """
    data: list[str] = []
    lines = response.iter_lines()
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line or not data:
            continue  # other fields (event:, id:, comments) and blank lines between events
        payload, data = "\n".join(data), []
        if payload.startswith("[DONE]"):
            await _drain(lines)
            return
        chunk = json.loads(payload)
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message if isinstance(message, str) else "the model endpoint failed during streaming",
                response.http_request,
                body=error,
            )
        yield chunk


def _usage_from(usage: dict[str, Any]) -> Usage:
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=prompt_details.get("cached_tokens") or 0,
        reasoning_tokens=completion_details.get("reasoning_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
    )
