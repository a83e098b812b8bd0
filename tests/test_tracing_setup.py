"""Tracing set-up: off by default, context round-trips through gRPC metadata."""

import http.server
import threading

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

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


def test_sdk_disabled_turns_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.resolve_endpoint("http://127.0.0.1:4317") is None


def test_spans_reach_an_otlp_http_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """An http://…/v1/traces endpoint gets OTLP/protobuf over HTTP POSTs."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    received: list[tuple[str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the name http.server calls
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        provider = TracerProvider()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        provider.add_span_processor(SimpleSpanProcessor(tracing._exporter(endpoint)))
        with provider.get_tracer("test").start_as_current_span("over http"):
            pass
        provider.shutdown()
    finally:
        server.shutdown()
        thread.join(5)
    ((path, body),) = received
    assert path == "/v1/traces"
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    names = [span.name for rs in request.resource_spans for ss in rs.scope_spans
             for span in ss.spans]
    assert names == ["over http"]
