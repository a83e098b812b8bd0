"""OpenTelemetry set-up shared by the router and the shards.

With no endpoint (neither --otlp-endpoint nor the standard OTEL_EXPORTER_OTLP_* variables),
or with OTEL_SDK_DISABLED=true, no provider is installed: `tracing_enabled()` is False and the
hot paths skip span work altogether (`optional_span` hands back a shared no-op context, and
the gRPC client sends no trace metadata). The trace context crosses the gRPC hop as W3C
`traceparent` metadata. Spans are exported in batches by a BatchSpanProcessor, which honours
OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE and OTEL_BSP_MAX_EXPORT_BATCH_SIZE.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.util.types import AttributeValue

_provider: TracerProvider | None = None
# What `optional_span` hands out while tracing is off: reusable, and its span ignores writes.
_NO_SPAN: contextlib.nullcontext[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The flag wins; else the standard environment variables, read at the entry point.

    None (tracing off) when OTEL_SDK_DISABLED is true, whatever the endpoint.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
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
    endpoint = resolve_endpoint(endpoint)
    if endpoint is None:
        return False
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "shardgen"
    resource = Resource.create({SERVICE_NAME: name, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
    use_provider(provider)
    return True


def use_provider(provider: TracerProvider) -> None:
    """Make `provider` the process's tracer provider and turn the traced paths on.

    setup_tracing ends here; tests call it with a provider that exports to memory. The
    OpenTelemetry API takes one global provider per process, so later calls change nothing.
    """
    global _provider
    if _provider is None:
        trace.set_tracer_provider(provider)
        _provider = provider


def shutdown_tracing() -> None:
    """Flush spans still queued; call once when the process stops."""
    if _provider is not None:
        _provider.shutdown()


def tracing_enabled() -> bool:
    """Whether spans are recorded and exported in this process."""
    return _provider is not None


def optional_span(tracer: trace.Tracer, name: str, *,
                  attributes: Mapping[str, AttributeValue] | None = None,
                  kind: trace.SpanKind = trace.SpanKind.INTERNAL,
                  context: otel_context.Context | None = None,
                  links: Sequence[trace.Link] = (),
                  ) -> contextlib.AbstractContextManager[trace.Span]:
    """`tracer.start_as_current_span(...)` when tracing is on; else a no-op context whose
    span (INVALID_SPAN) ignores attributes, so callers need no branch of their own.

    For per-step paths: with tracing off this costs one global lookup, not a span.
    """
    if _provider is None:
        return _NO_SPAN
    return tracer.start_as_current_span(name, context=context, kind=kind,
                                        attributes=attributes, links=links)


def inject_metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the trace context of `ctx` (default: the current one).

    Empty when that context holds no valid span (tracing off, or nothing traced here).
    """
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context that a caller put in gRPC metadata (empty context if none)."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)
