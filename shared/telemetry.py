"""OpenTelemetry for the services: traces, metrics and structured logs, chosen by the standard ``OTEL_*`` variables.

With none of them set, nothing is installed: the services' own spans and metrics go to OpenTelemetry's no-op API
(a few hundred nanoseconds per model round), no instrumentation wraps gRPC, Temporal or Redis, and nothing is
exported. ``setup`` turns it on for a process:

- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp`` (the default once an OTLP endpoint is set),
  ``console`` or ``none``; ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (default) or ``http/protobuf``;
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the rest of the exporters' own variables; ``OTEL_SERVICE_NAME`` (default
  ``agentrun-server`` or ``agentrun-worker``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``;
  ``OTEL_SDK_DISABLED=true`` turns everything off.
- ``AGENTRUN_LOG_FORMAT=json`` writes every log record as one JSON object, with the trace id and the run id.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from temporalio import activity

log = logging.getLogger("agentrun.telemetry")

# The instrumentation scope of the spans and metrics agentrun itself makes.
SCOPE = "agentrun"
LOG_FORMAT_VARIABLE = "AGENTRUN_LOG_FORMAT"

_enabled = False
_set_up = False
# The run a log record belongs to, where the code knows it (a gRPC call about a run).
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("agentrun_run_id", default="")
# A span id chosen by the caller instead of a random one: see ``approval_span_id``.
_chosen_span_id: contextvars.ContextVar[int] = contextvars.ContextVar("agentrun_span_id", default=0)


def enabled() -> bool:
    """Whether this process traces (``setup`` found a span exporter to use)."""
    return _enabled


def _exporter_names(kind: str) -> list[str]:
    """The exporters ``OTEL_<KIND>_EXPORTER`` names, or ``otlp`` when only an OTLP endpoint is set."""
    env = os.environ
    names = [n.strip() for n in env.get(f"OTEL_{kind}_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{kind}_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def disabled_instrumentations() -> set[str]:
    """The instrumentations that ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` turns off: ``grpc``, ``redis``,
    ``temporal``."""
    return {n.strip() for n in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",") if n.strip()}


def _protocol(kind: str) -> str:
    env = os.environ
    return env.get(f"OTEL_EXPORTER_OTLP_{kind}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"


class _IdGenerator(RandomIdGenerator):
    """Random ids, except where agentrun chose the span's id (an approval request, which its decision links to)."""

    def generate_span_id(self) -> int:
        return _chosen_span_id.get() or super().generate_span_id()


def setup(service_name: str) -> None:
    """Installs tracing, metrics and their instrumentation as the ``OTEL_*`` variables say. Call before connecting
    to Temporal and Redis; a second call changes nothing."""
    global _enabled, _set_up
    configure_logging()
    if _set_up:  # the dev stack runs the server and the worker in one process
        return
    _set_up = True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    traces, metric_exporters = _exporter_names("TRACES"), _exporter_names("METRICS")
    if not traces and not metric_exporters:
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes: dict[str, Any] = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    resource = Resource.create(attributes)
    if traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else _sampler()
        provider = TracerProvider(resource=resource, id_generator=_IdGenerator(), sampler=sampler)
        for name in traces:
            provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
        trace.set_tracer_provider(provider)
        if "redis" not in disabled_instrumentations():
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor().instrument(tracer_provider=provider)
        _enabled = True
    if metric_exporters:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers = [PeriodicExportingMetricReader(_metric_exporter(name)) for name in metric_exporters]
        metrics.set_meter_provider(MeterProvider(metric_readers=readers, resource=resource))
    log.info("telemetry on: traces to %s, metrics to %s", traces or "nowhere", metric_exporters or "nowhere")


def _sampler() -> Any:
    """Every trace, as the SDK's default does, except that no trace starts at an outgoing call: a Redis command of
    a background loop (the stream relay's, a heartbeat's) is not a request anyone follows."""
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

    class NoRootClientSpans(Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: trace.SpanKind | None = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind == trace.SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

        def get_description(self) -> str:
            return "NoRootClientSpans"

    return ParentBased(root=NoRootClientSpans())


def shutdown() -> None:
    """Exports what is buffered; the SDK also does this at exit, but a service that drains should not wait."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        stop = getattr(provider, "shutdown", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()


def _span_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    if _protocol("TRACES").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    if _protocol("METRICS").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return HttpMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def tracer() -> trace.Tracer:
    return trace.get_tracer(SCOPE)


def meter() -> metrics.Meter:
    return metrics.get_meter(SCOPE)


def trace_id_hex(span: trace.Span | None = None) -> str:
    """The current (or given) span's trace id as 32 hex digits; empty when nothing is traced."""
    context = (span or trace.get_current_span()).get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def traceparent() -> str:
    """The current span as a W3C ``traceparent`` value; empty when nothing is traced."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{trace.format_trace_id(context.trace_id)}-{trace.format_span_id(context.span_id)}-01"


def span_context_of(traceparent: str) -> trace.SpanContext | None:
    """The span a ``traceparent`` value names; None when it names none."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        context = trace.SpanContext(
            int(parts[1], 16), int(parts[2], 16), is_remote=True, trace_flags=trace.TraceFlags(int(parts[3], 16))
        )
    except ValueError:
        return None
    return context if context.is_valid else None


def approval_span_id(run_id: str, approval_id: str) -> int:
    """The span id of an approval's request span, the same in every process and on every retry, so that the
    decision (days later, maybe on another worker) links to it without storing it anywhere."""
    return int.from_bytes(hashlib.sha256(f"{run_id}/{approval_id}".encode()).digest()[:8], "big") or 1


@contextlib.contextmanager
def chosen_span_id(span_id: int) -> Iterator[None]:
    """Spans started in the block get ``span_id`` (with agentrun's tracer provider; others ignore it)."""
    token = _chosen_span_id.set(span_id)
    try:
        yield
    finally:
        _chosen_span_id.reset(token)


@dataclass(frozen=True)
class _Record:
    """What a log record carries besides its message."""

    trace_id: str
    span_id: str
    run_id: str


def _correlation(record: logging.LogRecord) -> _Record:
    context = trace.get_current_span().get_span_context()
    trace_id = trace.format_trace_id(context.trace_id) if context.is_valid else ""
    span_id = trace.format_span_id(context.span_id) if context.is_valid else ""
    run_id = getattr(record, "run_id", "") or current_run_id.get()
    if not run_id:
        # Temporal's workflow and activity loggers attach the workflow id, which is the run id.
        for extra in ("temporal_activity", "temporal_workflow"):
            details = getattr(record, extra, None)
            if isinstance(details, dict) and details.get("workflow_id"):
                run_id = str(details["workflow_id"])
                break
    if not run_id and activity.in_activity():
        # Any logger in an activity (the model client's, a tool's): the activity knows its run.
        run_id = activity.info().workflow_id or ""
    return _Record(trace_id, span_id, run_id)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the trace, span and run it belongs to."""

    def format(self, record: logging.LogRecord) -> str:
        ids = _correlation(record)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if ids.trace_id:
            entry["trace_id"], entry["span_id"] = ids.trace_id, ids.span_id
        if ids.run_id:
            entry["run_id"] = ids.run_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _CorrelatingFormatter(logging.Formatter):
    """The text format, with `` trace_id=... run_id=...`` added where a record has them."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        ids = _correlation(record)
        suffix = (f" trace_id={ids.trace_id}" if ids.trace_id else "") + (f" run_id={ids.run_id}" if ids.run_id else "")
        return text + suffix


def configure_logging() -> None:
    """Gives the root logger's handlers the JSON format when ``AGENTRUN_LOG_FORMAT=json``, and otherwise adds the
    trace and run ids to the text format."""
    json_wanted = os.environ.get(LOG_FORMAT_VARIABLE, "").strip().lower() == "json"
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter | _CorrelatingFormatter):
            continue
        if json_wanted:
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(_CorrelatingFormatter(handler.formatter or logging.Formatter()))


@dataclass(frozen=True)
class Instruments:
    """The metrics agentrun records, named after the OpenTelemetry semantic conventions where they have a name."""

    runs_started: metrics.Counter
    runs_ended: metrics.Counter
    model_duration: metrics.Histogram
    time_to_first_chunk: metrics.Histogram
    token_usage: metrics.Histogram
    tool_calls: metrics.Counter
    approval_wait: metrics.Histogram
    open_streams: metrics.UpDownCounter
    stream_events: metrics.Counter


_instruments: Instruments | None = None
# Bucket boundaries for GenAI durations and token counts, as the GenAI semantic conventions advise.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


def instruments() -> Instruments:
    """The instruments of this process (no-ops until ``setup`` installs a meter provider)."""
    global _instruments
    if _instruments is None:
        m = meter()
        _instruments = Instruments(
            runs_started=m.create_counter("agentrun.runs.started", unit="{run}", description="Runs started."),
            runs_ended=m.create_counter(
                "agentrun.runs.ended", unit="{run}", description="Runs that ended, by outcome."
            ),
            model_duration=m.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            ),
            time_to_first_chunk=m.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk",
                unit="s",
                description="Time from the request to the first chunk of the streamed reply.",
                explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            ),
            token_usage=m.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            ),
            tool_calls=m.create_counter(
                "agentrun.tool.calls", unit="{call}", description="Tool calls that ran, by tool and status."
            ),
            approval_wait=m.create_histogram(
                "agentrun.approval.wait", unit="s", description="Time from an approval request to its decision."
            ),
            open_streams=m.create_up_down_counter(
                "agentrun.streams.open", unit="{stream}", description="StreamRun calls open now."
            ),
            stream_events=m.create_counter(
                "agentrun.stream.events", unit="{event}", description="Run events relayed to StreamRun callers."
            ),
        )
    return _instruments
