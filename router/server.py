"""The router's HTTP API (TGI-compatible): the aiohttp app factory and its route handlers.

`create_app(config, tokenizer, engine, info)` builds the application; the process entry
(`main.py`) serves it. Every handler follows the same path: read the body within the
payload limit, validate, tokenize, submit to the engine, then turn the engine's token ids
into text (`TextStream`) and answer with one JSON body or a stream of server-sent events.

Errors are JSON `{"error": message, "error_type": kind}`: 400 for a malformed body, 413 for
one over --payload-limit, 422 for a bad parameter or a prompt that does not fit, 429 when
the engine is full, 424 when generation failed on the shards, 499 when it was cancelled
(DELETE /v1/requests/{id}, router/request_registry.py), 503 while shutting down, 504 when
a request passed its deadline (shardgen.router.deadlines).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from opentelemetry import context as otel_context

from shardgen.common.tracing import tracing_enabled
from shardgen.router import http_spans, tgi_schema
from shardgen.router.config import RouterConfig
from shardgen.router.deadlines import apply_deadline, deadline_middleware
from shardgen.router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shardgen.router.metrics import Metrics
from shardgen.router.request_metrics import RequestTimer, count_outcome
from shardgen.router.request_registry import RequestCancelledError
from shardgen.router.requests import (GenerationError, GenerationRequest, QueueFullError,
                                      RequestTimeoutError)
from shardgen.router.sse import EventStream
from shardgen.router.token_stream import RequestHandle, TextStream, TextToken
from shardgen.router.tokenization import Tokenizer
from shardgen.router.validation import (BodyShapeError, GenerateParameters, ValidationError,
                                        ValidationLimits, build_request, check_streamable,
                                        fit_to_limits, parse_generate_body)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes that answer without the API key: orchestrator probes and the metrics scrape.
_OPEN_ROUTES = frozenset({"/health", "/ready", "/metrics"})
# Routes whose outcomes the request counter counts.
_GENERATION_ROUTES = frozenset({"/generate", "/generate_stream", "/", "/v1/chat/completions",
                                "/v1/completions"})
# A handler that answered 200 but failed later (mid-stream) records its outcome here
# (typed request keys arrived in aiohttp 3.13; older ones take the plain string).
_OUTCOME: Any = (web.RequestKey("shardgen_outcome", str) if hasattr(web, "RequestKey")
                 else "shardgen_outcome")


class Engine(Protocol):
    """What the HTTP layer needs of the engine (shardgen.router.engine.Engine)."""

    def submit(self, request: GenerationRequest) -> RequestHandle: ...


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the served model that /info reports (from the shards' Info answer)."""

    model_id: str
    dtype: str
    device_type: str
    block_size: int
    num_shard: int
    max_position_embeddings: int
    version: str


class NotReadyError(Exception):
    """The router does not admit requests now (shutting down): HTTP 503."""


class UnauthorizedError(Exception):
    """The request lacks the API key that --api-key requires: HTTP 401."""


@dataclass
class ServerState:
    """Everything the handlers share; `accepting` turns false when draining starts."""

    config: RouterConfig
    tokenizer: Tokenizer
    engine: Engine
    info: ModelInfo
    limits: ValidationLimits
    metrics: Metrics | None = None
    accepting: bool = True


STATE = web.AppKey("shardgen_state", ServerState)


@dataclass(frozen=True)
class Prepared:
    """A validated, tokenized request, not yet submitted."""

    inputs: str
    params: GenerateParameters
    request: GenerationRequest
    timer: RequestTimer


@dataclass(frozen=True)
class Completion:
    """One finished generation, as `TextStream` left it, and the seed it was drawn with."""

    stream: TextStream
    tokens: list[TextToken]
    seed: int


# ---------------------------------------------------------------- app


def create_app(config: RouterConfig, tokenizer: Tokenizer, engine: Engine,
               info: ModelInfo, *, metrics: Metrics | None = None) -> web.Application:
    """The aiohttp application serving the TGI-style API over `engine`.

    config must have its limits resolved (`shardgen.router.config.resolve_limits`).
    With metrics, the app records per-request figures there and serves them on
    GET /metrics. Other route modules may add their routes to the returned app and read
    `app[STATE]`.
    """
    if config.max_input_tokens is None or config.max_total_tokens is None:
        raise ValueError("create_app needs a config whose token limits are resolved")
    limits = ValidationLimits(
        max_input_tokens=config.max_input_tokens, max_total_tokens=config.max_total_tokens,
        max_stop_sequences=config.max_stop_sequences, max_top_n_tokens=config.max_top_n_tokens,
        max_best_of=config.max_best_of, default_max_new_tokens=config.default_max_new_tokens)
    middlewares = [_error_middleware]
    if config.api_key:
        middlewares.append(_auth_middleware(config.api_key))
    middlewares.append(deadline_middleware(config.request_timeout_s))
    if tracing_enabled():
        # Outermost: the request's span covers the other middlewares and sees the status.
        middlewares.insert(0, http_spans.trace_requests)
    app = web.Application(client_max_size=config.payload_limit, middlewares=middlewares)
    app[STATE] = ServerState(config, tokenizer, engine, info, limits, metrics)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/info", model_info)
    if metrics is not None:
        app.router.add_get("/metrics", prometheus_metrics)
    return app


def stop_accepting(app: web.Application) -> None:
    """From now on, generation routes answer 503 and /ready answers 503."""
    app[STATE].accepting = False


# ---------------------------------------------------------------- middlewares


def error_response(status: int, message: str, error_type: str) -> web.Response:
    """The JSON error body every route uses."""
    return web.json_response({"error": message, "error_type": error_type}, status=status)


def _classify(request: web.Request, error: Exception) -> tuple[int, str, str] | None:
    """(status, message, error_type) answering an exception; None for a redirect."""
    state = request.app[STATE]
    if isinstance(error, UnauthorizedError):
        return 401, str(error), "authentication"
    if isinstance(error, BodyShapeError):
        return 400, str(error), "validation"
    if isinstance(error, ValidationError):
        return 422, str(error), "validation"
    if isinstance(error, NotReadyError) or (isinstance(error, QueueFullError)
                                            and not state.accepting):
        # The engine refuses because it drains: no reason for the client to retry here.
        return 503, str(error), "unavailable"
    if isinstance(error, QueueFullError):
        return 429, str(error) or "the server is overloaded", "overloaded"
    if isinstance(error, RequestTimeoutError):
        return 504, str(error), error.error_type
    if isinstance(error, RequestCancelledError):  # DELETE /v1/requests/{id}
        return 499, str(error), error.error_type
    if isinstance(error, GenerationError):
        logger.warning("generation failed: %s", error)
        return 424, str(error), error.error_type
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return 413, (f"the body is larger than the payload limit of "
                     f"{state.config.payload_limit} bytes (--payload-limit): {error.text}"
                     ), "validation"
    if isinstance(error, web.HTTPException):
        return None if error.status < 400 else (error.status, error.reason, "http")
    logger.error("%s %s failed", request.method, request.path, exc_info=error)
    return 500, f"internal error: {type(error).__name__}", "internal"


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes a JSON answer; generation requests are counted by outcome."""
    outcome = "cancelled"  # stays so when the client goes away mid-request
    try:
        response = await handler(request)
        outcome = request.get(_OUTCOME, "success")
        return response
    except Exception as error:  # each kind gets its status in _classify
        if _client_gone(request, error):
            # A write failed because the client left, before aiohttp cancelled this handler:
            # nobody reads an answer, and it is no error of ours; counted as cancelled.
            return web.Response(status=499)
        answer = _classify(request, error)
        if answer is None:
            raise
        status, message, outcome = answer
        response = error_response(status, message, outcome)
        if isinstance(error, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 names the methods
            response.headers["Allow"] = error.headers["Allow"]
        return response
    finally:
        if request.path in _GENERATION_ROUTES and request.method == "POST":
            count_outcome(request.app[STATE].metrics, outcome)
            http_spans.note_outcome(outcome)


def _client_gone(request: web.Request, error: Exception) -> bool:
    """Whether error is a write to a client that closed its connection."""
    transport = request.transport
    return isinstance(error, ConnectionResetError) and (transport is None
                                                        or transport.is_closing())


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _auth_middleware(api_key: str) -> Middleware:
    """Refuse (401) requests without `Authorization: Bearer <api_key>`, probes aside."""
    expected = _header_bytes(f"Bearer {api_key}")

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_ROUTES:
            given = _header_bytes(request.headers.get("Authorization", ""))
            # Constant-time comparison: the answer time must not leak the key.
            if not hmac.compare_digest(given, expected):
                raise UnauthorizedError("missing or wrong API key: send "
                                        "`Authorization: Bearer <key>`")
        return await handler(request)

    return check_api_key


def _header_bytes(value: str) -> bytes:
    """A header value as bytes for a comparison; surrogates (bytes that were not UTF-8)
    are kept distinct instead of failing the encode."""
    return value.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- shared steps


async def _read_json(request: web.Request) -> object:
    """The body as JSON (413 past the payload limit, 400 when it is not JSON)."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError as error:  # not JSON, not UTF-8, or an integer of over 4300 digits
        raise BodyShapeError(f"the body is not valid JSON: {error}") from error
    except RecursionError:
        raise BodyShapeError("the body is not valid JSON: its arrays or objects are nested "
                             "too deeply") from None


async def prepare(state: ServerState, body: object, timer: RequestTimer) -> Prepared:
    """Validate and tokenize a TGI /generate body."""
    if not state.accepting:
        raise NotReadyError("the server is shutting down and admits no new requests")
    with http_spans.child("validate"):
        inputs, params = parse_generate_body(body, state.limits)
        with http_spans.child("tokenize"):
            input_ids = await state.tokenizer.encode(
                inputs, parse_special_tokens=state.config.parse_special_tokens)
        input_ids, max_new_tokens = fit_to_limits(input_ids, params, state.limits)
        request = build_request(input_ids, max_new_tokens, params)
    # The engine continues the HTTP request's trace (queue, inference, batch steps, shards).
    request.trace_context = otel_context.get_current()
    http_spans.note_admitted(len(input_ids), max_new_tokens)
    timer.admitted(len(input_ids))
    return Prepared(inputs, params, request, timer)


def submit(state: ServerState, request: GenerationRequest) -> RequestHandle:
    """Hand a request to the engine; a prompt that can never fit its KV budget is a 422.

    The request takes the HTTP request's deadline (shardgen.router.deadlines).
    """
    try:
        return state.engine.submit(apply_deadline(request))
    except QueueFullError:
        raise
    except ValueError as error:
        raise ValidationError(str(error)) from error


async def run_to_end(state: ServerState, request: GenerationRequest,
                     params: GenerateParameters, timer: RequestTimer) -> Completion:
    """Submit one request and collect all its tokens (cancelled if this task is)."""
    stream = TextStream(submit(state, request), state.tokenizer, params.stop)
    tokens = []
    try:
        async for token in stream:
            timer.token()
            tokens.append(token)
    finally:
        stream.close()
    return Completion(stream, tokens, request.sampling.seed)


# ---------------------------------------------------------------- generation routes


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /generate: the whole generation in one JSON body."""
    state = request.app[STATE]
    timer = RequestTimer(state.metrics)
    prepared = await prepare(state, await _read_json(request), timer)
    return await _generate(state, prepared)


async def _generate(state: ServerState, prepared: Prepared) -> web.Response:
    params = prepared.params
    if params.best_of == 1:
        best, others = await run_to_end(state, prepared.request, params, prepared.timer), []
    else:
        best, others = await _best_of(state, prepared)
    prepared.timer.finished(len(best.tokens))
    _end_span(best.stream)
    body = tgi_schema.generate_response(prepared.inputs, params, _as_sequence(best, params),
                                        [_as_sequence(other, params) for other in others])
    return web.json_response(body)


def _as_sequence(completion: Completion, params: GenerateParameters) -> tgi_schema.Sequence:
    stream = completion.stream
    assert stream.finish_reason is not None, "run_to_end returns finished streams only"
    return tgi_schema.Sequence(
        generated_text=stream.generated_text, finish_reason=stream.finish_reason,
        tokens=completion.tokens, prefill=stream.prefill,
        seed=completion.seed if params.sampling.do_sample else None)


async def _best_of(state: ServerState, prepared: Prepared) -> tuple[Completion, list[Completion]]:
    """Run best_of samples of one prompt, each with its own seed; the likeliest comes first.

    Likeliest as in TGI: the highest sum of the generated tokens' log-probabilities.
    """
    params = prepared.params
    seeds = [params.sampling.seed] + [random.getrandbits(64) for _ in range(params.best_of - 1)]
    requests = [dataclasses.replace(prepared.request,
                                    sampling=dataclasses.replace(params.sampling, seed=seed))
                for seed in seeds]
    # The first sample times the request; timing the others too would count it twice.
    timers = [prepared.timer] + [RequestTimer(None)] * (len(requests) - 1)
    tasks = [asyncio.ensure_future(run_to_end(state, request, params, timer))
             for request, timer in zip(requests, timers)]
    try:
        completions = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # the others, when one failed; a no-op for finished ones
    ranked = sorted(completions, key=lambda c: sum(t.logprob for t in c.tokens), reverse=True)
    return ranked[0], ranked[1:]


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """POST /generate_stream: one server-sent event per token, the last with the text."""
    state = request.app[STATE]
    timer = RequestTimer(state.metrics)
    prepared = await prepare(state, await _read_json(request), timer)
    return await _generate_stream(request, state, prepared)


async def _generate_stream(request: web.Request, state: ServerState,
                           prepared: Prepared) -> web.StreamResponse:
    params = prepared.params
    check_streamable(params)
    events = EventStream(request)
    stream = TextStream(submit(state, prepared.request), state.tokenizer, params.stop)
    input_length = len(prepared.request.input_ids)
    try:
        async for token in stream:
            prepared.timer.token()
            final_text = None
            if token.finish_reason is not None:
                final_text = tgi_schema.full_text(prepared.inputs, stream.generated_text, params)
            await events.send(tgi_schema.stream_event(
                stream.generated_tokens, token, params, final_text=final_text,
                seed=params.reported_seed, input_length=input_length))
    except GenerationError as error:
        if not events.started:
            raise  # still time to answer 424 (504 for a deadline)
        logger.warning("generation failed mid-stream: %s", error)
        request[_OUTCOME] = error.error_type
        await events.send({"error": str(error), "error_type": error.error_type})
    finally:
        # Also when the client went away: a write raised, or aiohttp cancelled this task.
        stream.close()
    if stream.finish_reason is not None:
        prepared.timer.finished(stream.generated_tokens)
        _end_span(stream)
    return await events.finish()


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: TGI's compatibility route; `"stream": true` picks /generate_stream."""
    state = request.app[STATE]
    timer = RequestTimer(state.metrics)
    body = await _read_json(request)
    stream = body.get("stream", False) if isinstance(body, dict) else False
    if not isinstance(stream, bool):
        raise ValidationError(f"`stream` must be true or false, got {stream!r}")
    prepared = await prepare(state, body, timer)
    if stream:
        return await _generate_stream(request, state, prepared)
    return await _generate(state, prepared)


def _end_span(stream: TextStream) -> None:
    """Note the outcome of a finished generation on the request's span."""
    assert stream.finish_reason is not None
    http_spans.note_finished(stream.generated_tokens, stream.finish_reason.value)


# ---------------------------------------------------------------- probes and info


async def health(request: web.Request) -> web.Response:
    """GET /health: liveness; 200 as long as the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """GET /ready: readiness; 503 once the router drains for shutdown."""
    if not request.app[STATE].accepting:
        return error_response(503, "the server is shutting down", "unavailable")
    return web.json_response({"status": "ready"})


async def prometheus_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text format (served when the app has metrics)."""
    metrics = request.app[STATE].metrics
    assert metrics is not None, "the route exists only with metrics"
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def model_info(request: web.Request) -> web.Response:
    """GET /info: the model and the router's limits, with TGI's field names."""
    state = request.app[STATE]
    return web.json_response(tgi_schema.info_response(state.config, state.info))
