"""The engine's spans: a request's time in the queue and in inference, and each batch step.

Per request (children of its HTTP request's span, from `GenerationRequest.trace_context`):

- `queue`: from `Engine.submit` to the start of the request's first prefill step;
- `inference`: from there until the engine is done with it (finished, failed, cancelled).

Per step, one span named after what the router sent: `prefill`, `decode` or `filter`. A
step serves many requests of many traces; its span is a child of the `inference` span of
the first request riding in it (the longest running one: the shards' cached batch keeps
arrival order) and holds a link to the `inference` span of every request riding in it.
So a request's trace shows the steps it led, and every step names all of its requests.
The step's span is current while the router awaits the shards: the gRPC client puts its
context in the call's metadata, and each shard's RPC span is its child.

With tracing off (`tracing_enabled()` False) the engine gets `NO_SPANS` and `step_span`
returns a shared no-op context: the batching loop pays a global lookup and two small
closures per step (the riders and attributes are computed only when tracing is on).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from shardgen.common.tracing import optional_span, tracing_enabled

_tracer = trace.get_tracer("shardgen.router")

# Attribute names of the step spans.
BATCH_ID = "shardgen.batch.id"
BATCH_SIZE = "shardgen.batch.size"
PREFILL_REQUESTS = "shardgen.batch.prefill_requests"
PREFILL_TOKENS = "shardgen.batch.prefill_tokens"
DECODE_REQUESTS = "shardgen.batch.decode_requests"
FORWARD_NS = "shardgen.shard.forward_ns"
STEP_NS = "shardgen.shard.step_ns"
# Attribute names of the request spans.
REQUEST_ID = "shardgen.request.id"
END = "shardgen.request.end"  # "finished", "cancelled" (stop sequence, client gone), "failed"


class RequestSpans:
    """The queue and inference spans of one request; this base class records nothing.

    The engine calls `scheduled` when the request's first prefill starts and `ended`
    once when it leaves the engine, whatever the reason.
    """

    def scheduled(self) -> None:
        """The request's first prefill step starts: the queue ends, inference begins."""

    def ended(self, end: str, error: str | None = None) -> None:
        """The engine is done with the request: `end` is one of END's values; error says
        why it failed."""

    @property
    def inference(self) -> trace.Span | None:
        """The inference span (None before `scheduled`, and when nothing is recorded)."""
        return None


NO_SPANS = RequestSpans()


class _RecordedSpans(RequestSpans):
    def __init__(self, parent: otel_context.Context | None, request_id: int) -> None:
        self._parent = parent
        self._request_id = request_id
        self._queue: trace.Span | None = _tracer.start_span(
            "queue", context=parent, attributes={REQUEST_ID: request_id})
        self._inference: trace.Span | None = None

    def scheduled(self) -> None:
        if self._queue is None:
            return
        now = time.time_ns()
        self._queue.end(end_time=now)
        self._queue = None
        self._inference = _tracer.start_span(
            "inference", context=self._parent, start_time=now,
            attributes={REQUEST_ID: self._request_id})

    def ended(self, end: str, error: str | None = None) -> None:
        # A request that leaves before its first prefill (cancelled, failed) ends in queue.
        span = self._queue or self._inference
        self._queue = None
        if span is None or not span.is_recording():
            return  # ended already
        span.set_attribute(END, end)
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, error)
        span.end()

    @property
    def inference(self) -> trace.Span | None:
        return self._inference


def request_spans(trace_context: object | None, request_id: int) -> RequestSpans:
    """Start the spans of a request just submitted (NO_SPANS with tracing off).

    trace_context: the OpenTelemetry Context of its HTTP request, or None (no parent).
    """
    if not tracing_enabled():
        return NO_SPANS
    parent = trace_context if isinstance(trace_context, otel_context.Context) else None
    return _RecordedSpans(parent, request_id)


def step_span(method: str, riders: Callable[[], Sequence[RequestSpans]],
              attributes: Callable[[], Mapping[str, AttributeValue]]
              ) -> contextlib.AbstractContextManager[trace.Span]:
    """The span of one batch step, current while the router waits for the shards.

    riders: gives the spans of the requests in the step, the first one being its parent;
    attributes: gives the step's attributes. Both are called only when tracing is on.
    """
    if not tracing_enabled():
        return optional_span(_tracer, method)  # the shared no-op
    return _recorded_step(method, riders(), attributes())


@contextlib.contextmanager
def _recorded_step(method: str, riders: Sequence[RequestSpans],
                   attributes: Mapping[str, AttributeValue]) -> Iterator[trace.Span]:
    spans = [rider.inference for rider in riders]
    live = [span for span in spans if span is not None]
    # Without a rider in inference (not expected) the step starts a trace of its own.
    parent = trace.set_span_in_context(live[0]) if live else otel_context.Context()
    links = [trace.Link(span.get_span_context()) for span in live]
    with _tracer.start_as_current_span(method, context=parent, links=links,
                                       attributes=attributes) as span:
        yield span
