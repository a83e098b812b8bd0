"""OpenTelemetry set-up shared by the router and the shards.

With no endpoint (neither --otlp-endpoint nor the standard OTEL_EXPORTER_OTLP_* variables)
no provider is installed and the API's no-op tracer is used: spans cost a function call.
The trace context crosses the gRPC hop as W3C `traceparent` metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The flag wins; else the standard environment variables, read at the entry point."""
    return (endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def _uses_http(endpoint: str) -> bool:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "")
    if protocol.startswith("http"):
        return True
    return urlparse(endpoint).path.rstrip("/").endswith("/v1/traces")


def _exporter(endpoint: str) -> SpanExporter:
    if _uses_http(endpoint):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        if not urlparse(endpoint).path.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return Http(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

    return Grpc(endpoint=endpoint, insecure=not endpoint.startswith("https://"))


def setup_tracing(service_name: str | None, endpoint: str | None, *,
                  attributes: Mapping[str, str | int] | None = None) -> bool:
    """Install a tracer provider exporting OTLP to `endpoint`; False if tracing stays off.

    The service name is --otlp-service-name, else OTEL_SERVICE_NAME, else "shardgen".
    """
    global _provider
    endpoint = resolve_endpoint(endpoint)
    if endpoint is None:
        return False
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "shardgen"
    resource = Resource.create({SERVICE_NAME: name, **(attributes or {})})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
    trace.set_tracer_provider(_provider)
    return True


def shutdown_tracing() -> None:
    """Flush spans still queued; call once when the process stops."""
    if _provider is not None:
        _provider.shutdown()


def tracing_enabled() -> bool:
    return _provider is not None


def inject_metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the trace context of `ctx` (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context that a caller put in gRPC metadata (empty context if none)."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)
