"""The services' log records: JSON when asked, with the trace and the run they belong to."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared import telemetry


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("agentrun.test", logging.WARNING, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_a_json_record_carries_the_trace_and_the_run() -> None:
    tracer = TracerProvider().get_tracer("test")
    formatter = telemetry.JsonFormatter()
    with tracer.start_as_current_span("work") as span:
        token = telemetry.current_run_id.set("run-1")
        try:
            entry = json.loads(formatter.format(record("hello %s")))
        finally:
            telemetry.current_run_id.reset(token)
    context = span.get_span_context()
    assert entry["message"] == "hello %s"
    assert entry["level"] == "WARNING" and entry["logger"] == "agentrun.test"
    assert entry["trace_id"] == f"{context.trace_id:032x}" and entry["span_id"] == f"{context.span_id:016x}"
    assert entry["run_id"] == "run-1"


def test_the_run_id_comes_from_temporal_s_activity_details_outside_a_trace() -> None:
    entry = json.loads(telemetry.JsonFormatter().format(record("x", temporal_activity={"workflow_id": "run-2"})))
    assert entry["run_id"] == "run-2"
    assert "trace_id" not in entry


def test_text_logs_keep_their_format_and_add_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(telemetry.LOG_FORMAT_VARIABLE, raising=False)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        telemetry.configure_logging()
        assert handler.formatter is not None
        assert handler.formatter.format(record("plain", run_id="run-3")) == "WARNING plain run_id=run-3"
        monkeypatch.setenv(telemetry.LOG_FORMAT_VARIABLE, "json")
        handler.setFormatter(logging.Formatter())
        telemetry.configure_logging()
        assert json.loads(handler.format(record("as json")))["message"] == "as json"
    finally:
        root.removeHandler(handler)


def test_an_approval_s_request_span_id_is_the_same_everywhere() -> None:
    first = telemetry.approval_span_id("run-1", "ap-1")
    assert first == telemetry.approval_span_id("run-1", "ap-1") != telemetry.approval_span_id("run-1", "ap-2")
    assert 0 < first < 1 << 64
