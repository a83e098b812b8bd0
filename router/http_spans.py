"""The router's span per HTTP request, and the facts handlers note on it.

`trace_requests` is the outermost middleware of the app when tracing is on: every route
but the probes and the metrics scrape runs in a SERVER span named `{method} {route}` that
continues the caller's W3C `traceparent`, and that ends with the status the client got
(errors included, since the error middleware runs inside it).

Handlers add what only they know through `child` (the "validate" and "tokenize" spans),
`note_admitted` (prompt tokens, max_new_tokens) and `note_finished` (generated tokens,
finish reason); each is a no-op outside a recorded span, so handlers call them always.
The request's context also rides on the GenerationRequest (`trace_context`), and the
engine opens the request's "queue" and "inference" spans under it (router/engine_spans.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import propagate, trace

from shardgen.common.tracing import optional_span

_tracer = trace.get_tracer("shardgen.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Orchestrator probes and the scrape would bury the requests under spans nobody reads.
UNTRACED_ROUTES = frozenset({"/health", "/ready", "/metrics"})

# Attribute names: OpenTelemetry's HTTP and GenAI semantic conventions where they exist.
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
URL_PATH = "url.path"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
MAX_TOKENS = "gen_ai.request.max_tokens"
FINISH_REASON = "shardgen.finish_reason"
OUTCOME = "shardgen.outcome"


def _route(request: web.Request) -> str:
    """The matched route's pattern (bounded cardinality), or the method alone if none."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


@web.middleware
async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the request in its server span; see the module docstring."""
    if request.path in UNTRACED_ROUTES:
        return await handler(request)
    route = _route(request)
    attributes = {HTTP_METHOD: request.method, URL_PATH: request.path}
    if route:
        attributes[HTTP_ROUTE] = route
    with _tracer.start_as_current_span(
            f"{request.method} {route}".rstrip(), kind=trace.SpanKind.SERVER,
            context=propagate.extract(request.headers), attributes=attributes) as span:
        try:
            response = await handler(request)
        except web.HTTPException as answer:  # redirects and the like, raised as answers
            _note_status(span, answer.status)
            raise
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler). Not a fault of the server:
            # OpenTelemetry leaves the status alone for a BaseException like this one.
            span.set_attribute(OUTCOME, "cancelled")
            raise
        _note_status(span, response.status)
        return response


def _note_status(span: trace.Span, status: int) -> None:
    span.set_attribute(HTTP_STATUS, status)
    if status >= 500:  # a client's mistake (4xx) is not a failure of the server's span
        span.set_status(trace.StatusCode.ERROR)


def child(name: str) -> contextlib.AbstractContextManager[trace.Span]:
    """A child span of the current request's span (a no-op with tracing off)."""
    return optional_span(_tracer, name)


def note_admitted(input_tokens: int, max_new_tokens: int) -> None:
    """The request passed validation: its prompt tokens and its generation budget."""
    trace.get_current_span().set_attributes({INPUT_TOKENS: input_tokens,
                                             MAX_TOKENS: max_new_tokens})


def note_finished(generated_tokens: int, finish_reason: str) -> None:
    """The generation ended: tokens generated and why it stopped."""
    trace.get_current_span().set_attributes({OUTPUT_TOKENS: generated_tokens,
                                             FINISH_REASON: finish_reason})


def note_outcome(outcome: str) -> None:
    """How the request ended for the request counter: success, or its error_type."""
    trace.get_current_span().set_attribute(OUTCOME, outcome)
