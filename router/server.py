"""The router's HTTP API (TGI-compatible): the aiohttp app factory and its route handlers.

`create_app(config, tokenizer, engine, info)` builds the application; the process entry
(`main.py`) serves it. Every handler follows the same path: read the body within the
payload limit, validate, tokenize, submit to the engine, then turn the engine's token ids
into text (`TextStream`) and answer with one JSON body or a stream of server-sent events.

Errors are JSON `{"error": message, "error_type": kind}`: 400 for a malformed body, 413 for
one over --payload-limit, 422 for a bad parameter or a prompt that does not fit, 429 when
the engine is full, 424 when generation failed on the shards, 503 while shutting down.
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
from typing import Protocol

from aiohttp import web

from shardgen.router import tgi_schema
from shardgen.router.config import RouterConfig
from shardgen.router.requests import GenerationError, GenerationRequest, QueueFullError
from shardgen.router.sse import EventStream
from shardgen.router.token_stream import RequestHandle, TextStream, TextToken
from shardgen.router.tokenization import Tokenizer
from shardgen.router.validation import (BodyShapeError, GenerateParameters, ValidationError,
                                        ValidationLimits, build_request, check_streamable,
                                        fit_to_limits, parse_generate_body)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes that answer without the API key: orchestrator probes.
_OPEN_ROUTES = frozenset({"/health", "/ready"})


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


@dataclass
class ServerState:
    """Everything the handlers share; `accepting` turns false when draining starts."""

    config: RouterConfig
    tokenizer: Tokenizer
    engine: Engine
    info: ModelInfo
    limits: ValidationLimits
    accepting: bool = True


STATE = web.AppKey("shardgen_state", ServerState)


@dataclass(frozen=True)
class Prepared:
    """A validated, tokenized request, not yet submitted."""

    inputs: str
    params: GenerateParameters
    request: GenerationRequest


@dataclass(frozen=True)
class Completion:
    """One finished generation, as `TextStream` left it, and the seed it was drawn with."""

    stream: TextStream
    tokens: list[TextToken]
    seed: int


# ---------------------------------------------------------------- app


def create_app(config: RouterConfig, tokenizer: Tokenizer, engine: Engine,
               info: ModelInfo) -> web.Application:
    """The aiohttp application serving the TGI-style API over `engine`.

    config must have its limits resolved (`config.resolve_limits`). Other route modules
    may add their routes to the returned app and read `app[STATE]`.
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
    app = web.Application(client_max_size=config.payload_limit, middlewares=middlewares)
    app[STATE] = ServerState(config, tokenizer, engine, info, limits)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/info", model_info)
    return app


def stop_accepting(app: web.Application) -> None:
    """From now on, generation routes answer 503 and /ready answers 503."""
    app[STATE].accepting = False


# ---------------------------------------------------------------- middlewares


def error_response(status: int, message: str, error_type: str) -> web.Response:
    """The JSON error body every route uses."""
    return web.json_response({"error": message, "error_type": error_type}, status=status)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyShapeError as error:
        return error_response(400, str(error), "validation")
    except ValidationError as error:
        return error_response(422, str(error), "validation")
    except QueueFullError as error:
        if not request.app[STATE].accepting:
            # The engine refuses because it drains: that is not a reason to retry here.
            return error_response(503, str(error), "unavailable")
        return error_response(429, str(error) or "the server is overloaded, retry later",
                              "overloaded")
    except GenerationError as error:
        logger.warning("generation failed: %s", error)
        return error_response(424, str(error), "generation")
    except NotReadyError as error:
        return error_response(503, str(error), "unavailable")
    except web.HTTPRequestEntityTooLarge as error:
        limit = request.app[STATE].config.payload_limit
        return error_response(413, f"request body is larger than the payload limit of {limit} "
                              f"bytes (--payload-limit): {error.text}", "validation")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.reason, "http")


def _auth_middleware(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_ROUTES:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "missing or wrong API key: send "
                                      "`Authorization: Bearer <key>`", "authentication")
        return await handler(request)

    return check_api_key


# ---------------------------------------------------------------- shared steps


async def _read_json(request: web.Request) -> object:
    """The body as JSON (413 past the payload limit, 400 when it is not JSON)."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BodyShapeError(f"the body is not valid JSON: {error}") from error


async def prepare(state: ServerState, body: object) -> Prepared:
    """Validate and tokenize a TGI /generate body."""
    if not state.accepting:
        raise NotReadyError("the server is shutting down and admits no new requests")
    inputs, params = parse_generate_body(body, state.limits)
    input_ids = await state.tokenizer.encode(inputs)
    input_ids, max_new_tokens = fit_to_limits(input_ids, params, state.limits)
    return Prepared(inputs, params, build_request(input_ids, max_new_tokens, params))


def submit(state: ServerState, request: GenerationRequest) -> RequestHandle:
    """Hand a request to the engine; a prompt that can never fit its KV budget is a 422."""
    try:
        return state.engine.submit(request)
    except QueueFullError:
        raise
    except ValueError as error:
        raise ValidationError(str(error)) from error


async def run_to_end(state: ServerState, request: GenerationRequest,
                     params: GenerateParameters) -> Completion:
    """Submit one request and collect all its tokens (cancelled if this task is)."""
    stream = TextStream(submit(state, request), state.tokenizer, params.stop)
    try:
        tokens = [token async for token in stream]
    finally:
        stream.close()
    return Completion(stream, tokens, request.sampling.seed)


# ---------------------------------------------------------------- generation routes


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /generate: the whole generation in one JSON body."""
    state = request.app[STATE]
    prepared = await prepare(state, await _read_json(request))
    return await _generate(state, prepared)


async def _generate(state: ServerState, prepared: Prepared) -> web.Response:
    params = prepared.params
    if params.best_of == 1:
        best, others = await run_to_end(state, prepared.request, params), []
    else:
        best, others = await _best_of(state, prepared)
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
    tasks = [asyncio.ensure_future(run_to_end(state, request, params)) for request in requests]
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
    prepared = await prepare(state, await _read_json(request))
    return await _generate_stream(request, state, prepared)


async def _generate_stream(request: web.Request, state: ServerState,
                           prepared: Prepared) -> web.StreamResponse:
    params = prepared.params
    check_streamable(params)
    events = EventStream(request)
    stream = TextStream(submit(state, prepared.request), state.tokenizer, params.stop)
    input_length = len(prepared.request.input_ids)
    index = 0
    try:
        async for token in stream:
            index += 1
            final_text = None
            if token.finish_reason is not None:
                final_text = tgi_schema.full_text(prepared.inputs, stream.generated_text, params)
            await events.send(tgi_schema.stream_event(
                index, token, params, final_text=final_text, seed=params.reported_seed,
                input_length=input_length))
    except GenerationError as error:
        if not events.started:
            raise  # still time to answer 424
        logger.warning("generation failed mid-stream: %s", error)
        await events.send({"error": str(error), "error_type": "generation"})
    finally:
        # Also when the client went away: a write raised, or aiohttp cancelled this task.
        stream.close()
    return await events.finish()


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: TGI's compatibility route; `"stream": true` picks /generate_stream."""
    state = request.app[STATE]
    body = await _read_json(request)
    stream = body.get("stream", False) if isinstance(body, dict) else False
    if not isinstance(stream, bool):
        raise ValidationError(f"`stream` must be true or false, got {stream!r}")
    prepared = await prepare(state, body)
    if stream:
        return await _generate_stream(request, state, prepared)
    return await _generate(state, prepared)


# ---------------------------------------------------------------- probes and info


async def health(request: web.Request) -> web.Response:
    """GET /health: liveness; 200 as long as the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """GET /ready: readiness; 503 once the router drains for shutdown."""
    if not request.app[STATE].accepting:
        return error_response(503, "the server is shutting down", "unavailable")
    return web.json_response({"status": "ready"})


async def model_info(request: web.Request) -> web.Response:
    """GET /info: the model and the router's limits, with TGI's field names."""
    state = request.app[STATE]
    return web.json_response(tgi_schema.info_response(state.config, state.info))
