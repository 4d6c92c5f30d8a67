"""The worker's spans and metrics: a model call as the GenAI semantic conventions describe it, a tool call, and an
approval's request and decision. Nothing here runs per chunk of a reply."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from temporalio.exceptions import ApplicationError

from shared import telemetry
from shared.agents import AgentConfig
from shared.contract import Approval, ToolCallRequest, ToolOutcome, Usage

PROVIDER = "openai"


class ModelCall:
    """One model round: a ``chat {model}`` client span, and the GenAI metrics when it ends."""

    def __init__(self, agent: AgentConfig, base_url: str, round: int) -> None:
        self._agent = agent
        self._started = time.perf_counter()
        self.first_chunk_at = 0.0
        self._round = round
        address = urlsplit(base_url)
        self._server = {
            "server.address": address.hostname or "",
            "server.port": address.port or (443 if address.scheme == "https" else 80),
        }

    def _attributes(self) -> dict[str, Any]:
        agent = self._agent
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": agent.model,
            "gen_ai.agent.name": agent.name,
            "agentrun.model.round": self._round,
            **self._server,
        }
        for key, value in (
            ("gen_ai.request.temperature", agent.temperature),
            ("gen_ai.request.top_p", agent.top_p),
            ("gen_ai.request.max_tokens", agent.max_tokens),
        ):
            if value is not None:
                attributes[key] = value
        return attributes

    @contextlib.contextmanager
    def span(self) -> Iterator[trace.Span]:
        with telemetry.tracer().start_as_current_span(
            f"chat {self._agent.model}", kind=SpanKind.CLIENT, attributes=self._attributes()
        ) as span:
            try:
                yield span
            except BaseException as err:
                # The activity's error type (ModelUnavailable, ModelRejected, ...) says more than its class.
                error = (err.type if isinstance(err, ApplicationError) else None) or type(err).__name__
                span.set_attribute("error.type", error)
                self._record(None, "", error=error)
                raise

    def finish(
        self,
        span: trace.Span,
        usage: Usage,
        *,
        response_model: str,
        response_id: str,
        finish_reasons: list[str],
        messages: list[dict[str, Any]],
        text: str,
        calls: list[ToolCallRequest],
    ) -> None:
        if span.is_recording():
            attributes: dict[str, Any] = {
                "gen_ai.response.model": response_model or self._agent.model,
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
                "gen_ai.response.finish_reasons": finish_reasons,
            }
            if response_id:
                attributes["gen_ai.response.id"] = response_id
            if usage.cached_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.reasoning_tokens:
                attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if self.first_chunk_at:
                attributes["gen_ai.response.time_to_first_chunk"] = self.first_chunk_at - self._started
            if self._agent.trace_content:
                attributes["gen_ai.input.messages"] = json.dumps([_message(m) for m in messages])
                output = _message({"role": "assistant", "content": text, "tool_calls": _openai_calls(calls)})
                output["finish_reason"] = finish_reasons[-1] if finish_reasons else "stop"
                attributes["gen_ai.output.messages"] = json.dumps([output])
            span.set_attributes(attributes)
        self._record(usage, response_model)

    def _record(self, usage: Usage | None, response_model: str, *, error: str = "") -> None:
        metrics = telemetry.instruments()
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self._agent.model,
            **self._server,
        }
        if response_model:
            attributes["gen_ai.response.model"] = response_model
        if error:
            attributes["error.type"] = error
        metrics.model_duration.record(time.perf_counter() - self._started, attributes)
        if self.first_chunk_at:
            metrics.time_to_first_chunk.record(self.first_chunk_at - self._started, attributes)
        if usage is not None:
            metrics.token_usage.record(usage.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
            metrics.token_usage.record(usage.completion_tokens, {**attributes, "gen_ai.token.type": "output"})


def _openai_calls(calls: list[ToolCallRequest]) -> list[dict[str, Any]]:
    return [{"id": c.call_id, "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat message in the GenAI conventions' shape: a role and its parts."""
    parts: list[dict[str, Any]] = []
    if message.get("role") == "tool":
        parts.append({"type": "tool_call_response", "id": message.get("tool_call_id"), "response": message["content"]})
        return {"role": "tool", "parts": parts}
    if message.get("content"):
        parts.append({"type": "text", "content": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments"),
            }
        )
    return {"role": message.get("role", ""), "parts": parts}


@contextlib.contextmanager
def tool_call(name: str, call_id: str, arguments: str, *, record_content: bool) -> Iterator[trace.Span]:
    """An ``execute_tool {name}`` span around one tool call."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
    }
    if record_content:
        attributes["gen_ai.tool.call.arguments"] = arguments
    with telemetry.tracer().start_as_current_span(f"execute_tool {name}", attributes=attributes) as span:
        yield span


def tool_ended(span: trace.Span, name: str, outcome: ToolOutcome, *, record_content: bool) -> None:
    status = str(outcome.status)
    if span.is_recording():
        span.set_attribute("agentrun.tool.status", status)
        if outcome.error:
            span.set_status(Status(StatusCode.ERROR, outcome.error))
            span.set_attribute("error.type", "tool_error")
        elif record_content:
            span.set_attribute("gen_ai.tool.call.result", outcome.result)
    telemetry.instruments().tool_calls.add(1, {"gen_ai.tool.name": name, "agentrun.tool.status": status})


def approval_requested(run_id: str, approval: Approval) -> None:
    """The request's span: ended at once (the wait may last days), with an id that its decision can find."""
    with telemetry.chosen_span_id(telemetry.approval_span_id(run_id, approval.approval_id)):
        span = telemetry.tracer().start_span(f"approval.request {approval.tool_name}", attributes=_of(approval))
    span.end()


def approval_decided(run_id: str, approval: Approval) -> None:
    """The decision's span, linked to the request's; and how long the run waited."""
    request = trace.get_current_span().get_span_context()
    links = []
    if request.is_valid:
        linked = trace.SpanContext(
            request.trace_id, telemetry.approval_span_id(run_id, approval.approval_id), True, request.trace_flags
        )
        links.append(trace.Link(linked, {"agentrun.approval.id": approval.approval_id}))
    attributes = {
        **_of(approval),
        "agentrun.approval.decision": str(approval.decision),
        "agentrun.approval.approver": approval.approver,
        "agentrun.approval.timed_out": approval.timed_out,
    }
    telemetry.tracer().start_span(f"approval.decision {approval.tool_name}", attributes=attributes, links=links).end()
    if approval.requested_at:
        requested = datetime.strptime(approval.requested_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        waited = max(0.0, (datetime.now(UTC) - requested).total_seconds())
        telemetry.instruments().approval_wait.record(
            waited, {"gen_ai.tool.name": approval.tool_name, "agentrun.approval.decision": str(approval.decision)}
        )


def _of(approval: Approval) -> dict[str, Any]:
    return {
        "agentrun.approval.id": approval.approval_id,
        "gen_ai.tool.name": approval.tool_name,
        "gen_ai.tool.call.id": approval.call_id,
        "agentrun.approval.deadline": approval.deadline,
        "agentrun.approval.arguments_sha256": approval.arguments_sha256,
    }
