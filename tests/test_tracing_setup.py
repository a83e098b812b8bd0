"""Tracing set-up: off by default, context round-trips through gRPC metadata."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from shardgen.common import tracing


def test_no_endpoint_means_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.resolve_endpoint(None) is None
    assert tracing.setup_tracing("x", None) is False


def test_environment_endpoint_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.resolve_endpoint(None) == "http://127.0.0.1:4317"
    assert tracing.resolve_endpoint("http://other:4318/v1/traces") == "http://other:4318/v1/traces"


def test_http_endpoint_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    assert tracing._uses_http("http://127.0.0.1:4318/v1/traces")
    assert not tracing._uses_http("127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert tracing._uses_http("http://127.0.0.1:4318")


def test_context_round_trips_through_metadata() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("parent") as span:
        metadata = tracing.inject_metadata()
    assert any(key == "traceparent" for key, _ in metadata)
    restored = trace.get_current_span(tracing.extract_metadata(metadata)).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id
    assert restored.span_id == span.get_span_context().span_id
