"""A small OTLP receiver: what the services export over OTLP/gRPC, kept in memory and shown as trees of spans.

It serves the collector's own ``TraceService`` and ``MetricsService`` (from the ``opentelemetry-proto`` package),
so the services export to it exactly as they would to an OpenTelemetry Collector. The tests host one to check the
traces and metrics of real server and worker processes; ``agentrun dev --trace`` hosts one to print a run's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def value_of(value: AnyValue) -> Any:
    """An OTLP attribute value as Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes_of(attributes: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in attributes if isinstance(kv, KeyValue)}


@dataclass
class Span:
    """One received span, with the service that sent it."""

    service: str
    proto: trace_pb2.Span
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def trace_id(self) -> str:
        return self.proto.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.proto.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.proto.parent_span_id.hex()

    @property
    def links(self) -> list[tuple[str, str]]:
        """The (trace id, span id) of each span this one links to."""
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.proto.links]

    @property
    def duration_ms(self) -> float:
        return (self.proto.end_time_unix_nano - self.proto.start_time_unix_nano) / 1e6


@dataclass
class Metric:
    """One received metric's data points, with the service that sent it."""

    service: str
    proto: metrics_pb2.Metric

    @property
    def name(self) -> str:
        return self.proto.name

    def points(self) -> list[tuple[dict[str, Any], float]]:
        """(attributes, value) of each point: the value of a sum, or the sum of a histogram's values."""
        kind = self.proto.WhichOneof("data")
        if kind == "histogram":
            return [(attributes_of(p.attributes), p.sum) for p in self.proto.histogram.data_points]
        if kind == "sum":
            return [(attributes_of(p.attributes), _number(p)) for p in self.proto.sum.data_points]
        if kind == "gauge":
            return [(attributes_of(p.attributes), _number(p)) for p in self.proto.gauge.data_points]
        return []

    def counts(self) -> list[tuple[dict[str, Any], int]]:
        """(attributes, count) of each point of a histogram."""
        return [(attributes_of(p.attributes), p.count) for p in self.proto.histogram.data_points]


def _number(point: metrics_pb2.NumberDataPoint) -> float:
    return float(point.as_int) if point.WhichOneof("value") == "as_int" else point.as_double


def _service(resource: Any) -> str:
    return str(attributes_of(resource.attributes).get("service.name", ""))


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """Receives OTLP over gRPC and keeps every span and every metric export."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        # Every export, in order: cumulative metrics are read from the latest one of each name and service.
        self.metrics: list[Metric] = []
        self.received = asyncio.Event()

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                service = _service(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(Span(service, span, attributes_of(span.attributes)))
            self.received.set()
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_metrics in request.resource_metrics:
            service = _service(resource_metrics.resource)
            for scope_metrics in resource_metrics.scope_metrics:
                self.metrics.extend(Metric(service, metric) for metric in scope_metrics.metrics)
        self.received.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def latest(self, name: str) -> list[Metric]:
        """The latest export of the metric from each service that sent it."""
        latest: dict[str, Metric] = {}
        for metric in self.metrics:
            if metric.name == name:
                latest[metric.service] = metric
        return list(latest.values())

    async def wait(self) -> None:
        """Waits for the next export."""
        self.received.clear()
        await self.received.wait()


async def serve(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int, Collector]:
    """Starts a receiver; port 0 picks a free port. Export to it with ``OTEL_EXPORTER_OTLP_ENDPOINT=http://host:port``."""
    collector = Collector()
    server = grpc.aio.server()
    # One servicer object serves both services: each generated adder registers the methods of its own service.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound, collector


def tree(spans: list[Span]) -> Iterator[str]:
    """The lines of a trace drawn as a tree: each span under its parent, with its service and duration."""
    by_id = {span.span_id: span for span in spans}
    children: dict[str, list[Span]] = {}
    roots = []
    for span in sorted(spans, key=lambda s: s.proto.start_time_unix_nano):
        if span.parent_id and span.parent_id in by_id:
            children.setdefault(span.parent_id, []).append(span)
        else:
            roots.append(span)

    def lines(span: Span, depth: int) -> Iterator[str]:
        links = f"  (links {len(span.links)})" if span.links else ""
        yield f"{'  ' * depth}{span.name}  [{span.service}] {span.duration_ms:.1f} ms{links}"
        for child in children.get(span.span_id, []):
            yield from lines(child, depth + 1)

    for root in roots:
        yield from lines(root, 0)


async def print_traces(
    collector: Collector, stop: asyncio.Event, *, only: str = "", quiet_seconds: float = 2.0
) -> None:
    """Prints each trace as a tree once no span of it has arrived for ``quiet_seconds``, and when ``stop`` is set,
    every trace not printed yet; with ``only``, the traces that a service whose name starts with it took part in."""
    printed: set[str] = set()
    sizes: dict[str, int] = {}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), quiet_seconds)
        by_trace: dict[str, list[Span]] = {}
        for span in collector.spans:
            by_trace.setdefault(span.trace_id, []).append(span)
        for trace_id, spans in by_trace.items():
            if trace_id in printed or not any(span.service.startswith(only) for span in spans):
                continue
            if sizes.get(trace_id) == len(spans) or stop.is_set():
                printed.add(trace_id)
                print(f"trace {trace_id} ({len(spans)} spans)")
                for line in tree(spans):
                    print(f"  {line}")
                print(flush=True)
            sizes[trace_id] = len(spans)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Receive OTLP over gRPC and print each trace as a tree.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317, help="4317 is OTLP/gRPC's usual port")
    parser.add_argument("--quiet", action="store_true", help="receive, print nothing")
    parser.add_argument("--only", default="", metavar="PREFIX", help="print only traces of services named so")
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        server, port, collector = await serve(args.host, args.port)
        print(f"OTLP/gRPC receiver on {args.host}:{port}: set OTEL_EXPORTER_OTLP_ENDPOINT=http://{args.host}:{port}")
        try:
            if args.quiet:
                await stop.wait()
            else:
                await print_traces(collector, stop, only=args.only)
        finally:
            await server.stop(0)

    asyncio.run(run())


if __name__ == "__main__":
    main()
