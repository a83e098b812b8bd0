"""Request deadlines: the server's --request-timeout and a client's x-request-timeout header.

A generation request's deadline is fixed when it arrives: the arrival time plus the
shorter of the server's limit and the client's header (a client may ask for less time,
never for more). A middleware computes it for every POST request and keeps it in a
context variable, so that every route, whatever module serves it, has its engine
requests carry it: `apply_deadline` (called where requests are submitted) copies it onto
the request. The engine checks deadlines between steps and fails a request that passed
its own with RequestTimeoutError, which the HTTP layer answers with 504 (error_type
"timeout"), or with an error event when the stream has started.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shardgen.router.requests import GenerationRequest
from shardgen.router.validation import ValidationError

TIMEOUT_HEADER = "x-request-timeout"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# The deadline of the HTTP request being handled (time.monotonic() clock), None for none.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "shardgen_request_deadline", default=None)


def parse_timeout_header(value: str) -> float:
    """Seconds from an x-request-timeout value; ValidationError unless a positive number."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0.0 < seconds < math.inf:  # also refuses NaN
        raise ValidationError(f"the {TIMEOUT_HEADER} header must be a positive number of "
                              f"seconds, got {value[:40]!r}")
    return seconds


def timeout_of(header: str | None, server_timeout_s: float | None) -> float | None:
    """The time a request gets: the shorter of the header's and the server's, if any."""
    limits: list[float] = [] if server_timeout_s is None else [server_timeout_s]
    if header is not None:
        limits.append(parse_timeout_header(header))
    return min(limits, default=None)


def deadline_middleware(server_timeout_s: float | None) -> Middleware:
    """A middleware fixing each POST request's deadline at its arrival.

    Must run inside the error middleware: a malformed header is a ValidationError (422).
    """
    @web.middleware
    async def set_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        timeout_s = timeout_of(request.headers.get(TIMEOUT_HEADER), server_timeout_s)
        token = _deadline.set(None if timeout_s is None else time.monotonic() + timeout_s)
        try:
            return await handler(request)
        finally:
            _deadline.reset(token)

    return set_deadline


def current_deadline() -> float | None:
    """The deadline of the HTTP request this task serves (None outside one, or for none)."""
    return _deadline.get()


def apply_deadline(request: GenerationRequest) -> GenerationRequest:
    """Give request the current HTTP request's deadline, unless it has an earlier one."""
    deadline = current_deadline()
    if deadline is not None and (request.deadline is None or deadline < request.deadline):
        request.deadline = deadline
    return request
