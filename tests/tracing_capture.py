"""Spans of the code under test, kept in memory.

`capture_spans()` turns tracing on for this test process (the OpenTelemetry API takes one
global provider per process, so the provider is installed once and kept) and returns the
exporter, emptied. Spans end up there synchronously, as soon as they end. Helpers below
index finished spans by name and check parent/child relations by span ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shardgen.common import tracing

_EXPORTER = InMemorySpanExporter()
_installed = False


def capture_spans() -> InMemorySpanExporter:
    """Tracing on, every finished span in the returned exporter (emptied now)."""
    global _installed
    if not _installed:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        tracing.use_provider(provider)
        _installed = True
    _EXPORTER.clear()
    return _EXPORTER


def named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    """The spans of that name, in the order they ended."""
    return [span for span in spans if span.name == name]


def only(spans: Iterable[ReadableSpan], name: str) -> ReadableSpan:
    """The one span of that name (fails when there are none or several)."""
    found = named(spans, name)
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s.name for s in spans]}"
    return found[0]


def is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    """Whether `child`'s parent is `parent` (same trace, parent span id)."""
    return (child.parent is not None
            and child.parent.span_id == parent.context.span_id
            and child.context.trace_id == parent.context.trace_id)
