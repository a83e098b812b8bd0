"""Request ids and explicit cancellation: `x-request-id` and DELETE /v1/requests/{id}.

Every HTTP request gets an id: the client's `x-request-id` header when it is a valid one
(1 to 128 characters among letters, digits and `-_.:`), else a fresh random one. The id
comes back in the `x-request-id` response header, on errors and streams too.

A generation request registers its id when it submits its first engine request. From then
until its HTTP response ends, `DELETE /v1/requests/{id}` cancels every engine request it
made (the n choices of an OpenAI request, the best_of samples of a TGI one): the engine
drops them and frees their blocks at its next step, and the cancelled HTTP request ends
with 499 `{"error_type": "cancelled"}`, or, once it streams, with an SSE error event of
that type. An id given by a client can belong to one running request at a time.

Handlers do not pass ids around: `TrackingEngine` wraps the engine and finds the current
HTTP request through a context variable that the middleware sets (tasks that a handler
starts, such as best_of samples, inherit it).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from shardgen.router.requests import GenerationError, GenerationRequest, PrefillEvent, TokenEvent
from shardgen.router.token_stream import RequestHandle
from shardgen.router.validation import ValidationError

REQUEST_ID_HEADER = "x-request-id"
CANCEL_ROUTE = "/v1/requests/{request_id}"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The id of each HTTP request (typed request keys arrived in aiohttp 3.13).
REQUEST_ID: Any = (web.RequestKey("shardgen_request_id", str) if hasattr(web, "RequestKey")
                   else "shardgen_request_id")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestCancelledError(GenerationError):
    """The request was cancelled through DELETE /v1/requests/{id} (HTTP 499 "cancelled")."""

    error_type = "cancelled"


class RequestIdInUseError(ValidationError):
    """A client's x-request-id names a request that is still running (HTTP 422)."""


class Engine(Protocol):
    def submit(self, request: GenerationRequest) -> RequestHandle: ...


@dataclass(eq=False)
class _Scope:
    """One HTTP request: its id and the engine requests it made."""

    request_id: str
    handles: list[RequestHandle] = field(default_factory=list)
    registered: bool = False
    cancelled: bool = False


_current_scope: ContextVar[_Scope | None] = ContextVar("shardgen_request_scope", default=None)


def valid_request_id(value: str | None) -> bool:
    """Whether a client's x-request-id is one the server honours."""
    return value is not None and _VALID_ID.fullmatch(value) is not None


def current_request_id() -> str | None:
    """The id of the HTTP request being handled (None outside the middleware)."""
    scope = _current_scope.get()
    return scope.request_id if scope is not None else None


class RequestRegistry:
    """The running generation requests by id, and the middleware that names requests."""

    def __init__(self) -> None:
        self._running: dict[str, _Scope] = {}

    def __len__(self) -> int:
        return len(self._running)

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        """An aiohttp middleware that gives each request its id (put it after the auth one)."""

        @web.middleware
        async def name_request(request: web.Request, handler: Handler) -> web.StreamResponse:
            given = request.headers.get(REQUEST_ID_HEADER)
            request_id = given if valid_request_id(given) else uuid.uuid4().hex
            request[REQUEST_ID] = request_id
            scope = _Scope(request_id)
            token = _current_scope.set(scope)
            try:
                return await handler(request)
            finally:
                _current_scope.reset(token)
                if scope.registered:
                    del self._running[request_id]

        return name_request

    def cancel(self, request_id: str) -> int | None:
        """Cancel the engine requests of a running request; how many, or None if unknown."""
        scope = self._running.get(request_id)
        if scope is None:
            return None
        scope.cancelled = True
        for handle in scope.handles:
            handle.cancel()
        return len(scope.handles)

    def track(self, engine: Engine, request: GenerationRequest) -> RequestHandle:
        """Submit request to engine on behalf of the current HTTP request (if any)."""
        scope = _current_scope.get()
        if scope is None:  # not inside an HTTP request: nothing can name it
            return engine.submit(request)
        if not scope.registered:
            if scope.request_id in self._running:
                raise RequestIdInUseError(
                    f"x-request-id {scope.request_id!r} belongs to a request that is still "
                    f"running; give a unique id, or none to get one")
            self._running[scope.request_id] = scope
            scope.registered = True
        handle = _TrackedHandle(engine.submit(request), scope)
        scope.handles.append(handle)
        if scope.cancelled:
            handle.cancel()
        return handle


class _TrackedHandle:
    """An engine handle whose stream ends with RequestCancelledError once DELETE cancelled it."""

    def __init__(self, inner: RequestHandle, scope: _Scope) -> None:
        self._inner = inner
        self._scope = scope

    @property
    def id(self) -> int:
        return self._inner.id

    def cancel(self) -> None:
        self._inner.cancel()

    async def __aiter__(self) -> AsyncIterator[PrefillEvent | TokenEvent]:
        async for event in self._inner:
            yield event
        if self._scope.cancelled:
            request_id = self._scope.request_id
            raise RequestCancelledError(
                f"request {request_id} was cancelled (DELETE /v1/requests/{request_id})")


class TrackingEngine:
    """The engine as the HTTP layer sees it: every submit is registered under its request id."""

    def __init__(self, engine: Engine, registry: RequestRegistry) -> None:
        self._engine = engine
        self._registry = registry

    def submit(self, request: GenerationRequest) -> RequestHandle:
        return self._registry.track(self._engine, request)


REGISTRY = web.AppKey("shardgen_request_registry", RequestRegistry)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every response names its request."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


async def cancel_request(request: web.Request) -> web.Response:
    """DELETE /v1/requests/{request_id}: cancel a running generation request."""
    request_id = request.match_info["request_id"]
    cancelled = request.app[REGISTRY].cancel(request_id)
    if cancelled is None:
        return web.json_response(
            {"error": f"no running request has the id {request_id!r} (finished, never "
                      f"started, or not a generation request)", "error_type": "not_found"},
            status=404)
    return web.json_response({"request_id": request_id, "cancelled": True,
                              "engine_requests": cancelled})


def install(app: web.Application, registry: RequestRegistry) -> None:
    """Name every request of app and serve DELETE /v1/requests/{request_id}.

    The app's engine must be a `TrackingEngine` over the same registry. The naming
    middleware goes last, inside the error and auth middlewares, so that errors raised by
    handlers still get their JSON answer (and the header).
    """
    app[REGISTRY] = registry
    app.middlewares.append(registry.middleware())
    app.on_response_prepare.append(add_request_id_header)
    app.router.add_delete(CANCEL_ROUTE, cancel_request)
