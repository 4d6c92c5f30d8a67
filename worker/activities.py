"""Activities of an agent run: every side effect the workflow needs happens here."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from temporalio import activity
from temporalio.exceptions import ApplicationError

from agentrun.v1 import agent_service_pb2 as pb
from worker.agents import AgentConfig
from worker.run_stream import RunStreamWriter, new_event

# How often a running model call tells Temporal it is alive. Cancellation reaches
# the activity through the answer to a heartbeat, so this also bounds how long a
# cancelled run keeps streaming.
HEARTBEAT_INTERVAL_SECONDS = 0.5


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
    """One model round of a run; ``after_sequence`` is the last event the workflow knows was published."""

    run_id: str
    agent: AgentConfig
    messages: list[dict[str, str]]
    after_sequence: int


@dataclass
class ModelReply:
    """What the model answered, what it cost, and the last event sequence the round published."""

    text: str
    usage: Usage
    last_sequence: int


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

    def __init__(self, writer: RunStreamWriter, run_id: str, after_sequence: int) -> None:
        self._writer = writer
        self._run_id = run_id
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
                result = await self._writer.append(self._run_id, batch, floor=self.last_sequence)
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


async def _heartbeat_forever() -> None:
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_INTERVAL_SECONDS)


class RunActivities:
    """Activities bound to the worker's clients (model and Redis)."""

    def __init__(self, model: openai.AsyncOpenAI, stream: RunStreamWriter, agents: dict[str, AgentConfig]) -> None:
        self._model = model
        self._stream = stream
        self._agents = agents

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

    @activity.defn
    async def call_model(self, input: CallModelInput) -> ModelReply:
        """Streams one model reply, publishing each text delta to the run's stream as it arrives."""
        self._check_agent(input.agent)
        agent = input.agent
        # A retry must not repeat text that an earlier attempt already streamed:
        # what that attempt published is skipped as long as the new reply agrees.
        already_sent = ""
        if activity.info().attempt > 1:
            earlier = await self._stream.read_after(input.run_id, input.after_sequence)
            already_sent = "".join(e.text_delta.text for e in earlier if e.HasField("text_delta"))
        publisher = _Publisher(self._stream, input.run_id, input.after_sequence)
        heartbeat = asyncio.create_task(_heartbeat_forever())
        text: list[str] = []
        usage = Usage()
        position = 0
        try:
            response = await self._model.chat.completions.create(
                model=agent.model,
                messages=cast("list[ChatCompletionMessageParam]", input.messages),
                stream=True,
                stream_options={"include_usage": True},
                temperature=agent.temperature if agent.temperature is not None else openai.omit,
                top_p=agent.top_p if agent.top_p is not None else openai.omit,
                max_completion_tokens=agent.max_tokens if agent.max_tokens is not None else openai.omit,
            )
            async for chunk in response:
                if chunk.usage is not None:
                    usage = _usage_from(chunk.usage)
                for choice in chunk.choices:
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
        finally:
            heartbeat.cancel()
        return ModelReply(text="".join(text), usage=usage, last_sequence=publisher.last_sequence)

    @activity.defn
    async def publish_terminal_event(self, input: PublishInput) -> int:
        """Publishes the run's last event; returns its sequence number."""
        if input.kind == "run_completed":
            event = new_event(run_completed=pb.RunCompleted(output=input.output, usage=input.usage.to_proto()))
        elif input.kind == "run_failed":
            event = new_event(run_failed=pb.RunFailed(error=input.error))
        elif input.kind == "run_cancelled":
            event = new_event(run_cancelled=pb.RunCancelled(reason=input.reason))
        else:
            raise ApplicationError(f"unknown terminal event kind {input.kind!r}", non_retryable=True)
        result = await self._stream.append(input.run_id, [event], floor=input.after_sequence)
        return result.last_sequence


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
