"""GET /openapi.json: the OpenAPI 3.1 description of every route, written as data.

`openapi_spec` builds the document from the server's configuration (limits become schema
bounds, the API key a security requirement); the schemas themselves are in
router/openapi_schemas.py. tests/test_http_openapi.py checks that the document names every
route the app serves and no other, so a new route must be described here.
"""

from __future__ import annotations

from aiohttp import web

from shardgen.router.config import RouterConfig
from shardgen.router.deadlines import TIMEOUT_HEADER
from shardgen.router.openapi_schemas import JsonDict, openai_schemas, ref, tgi_schemas
from shardgen.router.request_registry import REQUEST_ID_HEADER
from shardgen.router.server import STATE, ModelInfo
from shardgen.router.validation import ValidationLimits

OPENAPI_ROUTE = "/openapi.json"
_SPEC = web.AppKey("shardgen_openapi_spec", dict)

# What each error status means; every route lists those it can answer.
_ERRORS = {
    400: "the body is not a JSON object of the expected shape",
    401: "missing or wrong API key (--api-key)",
    404: "no such resource",
    413: "the body is larger than --payload-limit",
    422: "a parameter is out of range, or the prompt does not fit the token limits",
    424: "generation failed on the shards",
    429: "--max-concurrent-requests requests are running; retry later",
    499: "cancelled through DELETE /v1/requests/{request_id}",
    503: "the server is shutting down",
    504: "the request passed its deadline (--request-timeout, x-request-timeout)",
}
_GENERATION_ERRORS = (400, 413, 422, 424, 429, 499, 503, 504)
_SSE = "text/event-stream"


def _json(schema: JsonDict, description: str = "OK") -> JsonDict:
    return {"description": description, "content": {"application/json": {"schema": schema}},
            "headers": {REQUEST_ID_HEADER: {"description": "the request's id (for DELETE "
                                                           "/v1/requests/{request_id})",
                                            "schema": {"type": "string"}}}}


def _errors(codes: tuple[int, ...], openai: bool) -> dict[str, JsonDict]:
    schema = ref("OpenAIError" if openai else "ErrorResponse")
    return {str(code): _json(schema, _ERRORS[code]) for code in codes}


def _body(schema_name: str) -> JsonDict:
    return {"required": True, "content": {"application/json": {"schema": ref(schema_name)}}}


_REQUEST_ID_PARAMETER: JsonDict = {
    "name": REQUEST_ID_HEADER, "in": "header", "required": False,
    "description": "an id for the request: 1 to 128 of A-Z a-z 0-9 . _ : - (any other "
                   "value is replaced by a made-up id, as is a missing one)",
    "schema": {"type": "string"}}


_TIMEOUT_PARAMETER: JsonDict = {
    "name": TIMEOUT_HEADER, "in": "header", "required": False,
    "description": "seconds the request may take, a positive number (at most "
                   "--request-timeout counts); past them it ends with 504; anything else "
                   "is a 422",
    "schema": {"type": "string"}}


def _generation(summary: str, body: str, ok: JsonDict, *, openai: bool = False) -> JsonDict:
    return {"summary": summary, "parameters": [_REQUEST_ID_PARAMETER, _TIMEOUT_PARAMETER],
            "requestBody": _body(body),
            "responses": {"200": ok, **_errors(_GENERATION_ERRORS, openai)}}


def _event(event_schema: str | None, error_schema: str | None, done: bool) -> JsonDict:
    """One server-sent event (OpenAPI 3.1 gives the schema of each event of a stream):
    its data is JSON, an event_schema or, when the stream fails, an error_schema."""
    data: JsonDict = {"type": "string", "contentMediaType": "application/json"}
    if event_schema is not None and error_schema is not None:
        data["contentSchema"] = {"anyOf": [ref(event_schema), ref(error_schema)]}
    if done:  # OpenAI streams end with an event that is not JSON
        data = {"anyOf": [data, {"const": "[DONE]"}]}
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _json_or_stream(json_schema: str, event_schema: str, description: str, *,
                    openai: bool) -> JsonDict:
    answer = _json(ref(json_schema), description)
    event = _event(event_schema, "OpenAIError" if openai else "ErrorResponse", done=openai)
    answer["content"][_SSE] = {"schema": event}  # type: ignore[index]
    return answer


def _stream(event_schema: str | None, description: str) -> JsonDict:
    error_schema = "ErrorResponse" if event_schema is not None else None
    return {"description": description,
            "content": {_SSE: {"schema": _event(event_schema, error_schema, done=False)}}}


def _paths() -> dict[str, JsonDict]:
    return {
        "/generate": {"post": _generation(
            "Generate text (TGI)", "GenerateRequest", _json(ref("GenerateResponse")))},
        "/generate_stream": {"post": _generation(
            "Generate text as server-sent events, one per token (TGI)", "GenerateRequest",
            _stream("StreamResponse", "tokens; an error arrives as a {error, error_type} "
                                      "event"))},
        "/": {"post": _generation(
            "TGI's compatibility route: /generate, or /generate_stream with stream: true",
            "CompatGenerateRequest", _json_or_stream("GenerateResponse", "StreamResponse",
                                                     "the generation", openai=False))},
        "/v1/chat/completions": {"post": _generation(
            "OpenAI chat completion (the tokenizer's chat template)", "ChatCompletionRequest",
            _json_or_stream("ChatCompletion", "ChatCompletionChunk", "the completion",
                            openai=True), openai=True)},
        "/v1/completions": {"post": _generation(
            "OpenAI (legacy) completion", "CompletionRequest",
            _json_or_stream("Completion", "CompletionChunk", "the completion", openai=True),
            openai=True)},
        "/v1/models": {"get": {"summary": "The served model (OpenAI)", "responses": {
            "200": _json(ref("ModelList"))}}},
        "/v1/models/{model_id}": {"get": {
            "summary": "The served model, by id (OpenAI)",
            "parameters": [{"name": "model_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(ref("Model")), **_errors((404,), openai=True)}}},
        "/v1/requests/{request_id}": {"delete": {
            "summary": "Cancel a running generation request; its KV blocks are freed at the "
                       "engine's next step and the request answers 499 (or an SSE error "
                       "event)",
            "parameters": [{"name": "request_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(ref("CancelResponse")), **_errors((404,), False)}}},
        "/tokenize": {"post": {
            "summary": "The prompt's tokens, with their character offsets (TGI)",
            "requestBody": _body("TokenizeRequest"),
            "responses": {"200": _json({"type": "array", "items": ref("SimpleToken")}),
                          **_errors((400, 413, 422), False)}}},
        "/info": {"get": {"summary": "The model, the limits and the version",
                          "responses": {"200": _json(ref("Info"))}}},
        "/health": {"get": {"summary": "Liveness: the process answers",
                            "responses": {"200": _json(ref("Status"))}}},
        "/ready": {"get": {"summary": "Readiness: warmed up and admitting requests",
                           "responses": {"200": _json(ref("Status")),
                                         **_errors((503,), False)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "the text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/v1/kv_events": {"get": {
            "summary": "Prefix-cache events (blocks stored, removed, cleared) as an endless "
                       "server-sent event stream",
            "responses": {"200": _stream(None, "the events (router/kv_events_api.py)")}}},
        OPENAPI_ROUTE: {"get": {"summary": "This document", "responses": {
            "200": {"description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }


# Routes answered without the API key (server.py's _OPEN_ROUTES).
_OPEN_PATHS = ("/health", "/ready", "/metrics")
# Routes whose errors have OpenAI's shape (openai_api.openai_errors).
_OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models",
                 "/v1/models/{model_id}")


def openapi_spec(config: RouterConfig, limits: ValidationLimits, info: ModelInfo, *,
                 serves_metrics: bool = True) -> JsonDict:
    """The OpenAPI document of a server with this configuration (GET /metrics only when
    serves_metrics)."""
    paths = _paths()
    if not serves_metrics:
        del paths["/metrics"]
    if config.api_key:
        for path, operations in paths.items():
            for operation in operations.values():
                if path in _OPEN_PATHS:
                    operation["security"] = []  # type: ignore[index]
                else:
                    error = "OpenAIError" if path in _OPENAI_PATHS else "ErrorResponse"
                    operation.setdefault("responses", {})["401"] = _json(  # type: ignore[index]
                        ref(error), _ERRORS[401])
    spec: JsonDict = {
        "openapi": "3.1.0",
        "info": {"title": "shardgen", "version": info.version,
                 "description": f"Text generation with {info.model_id}: TGI-style and "
                                f"OpenAI-compatible routes."},
        "paths": paths,
        "components": {"schemas": {**tgi_schemas(limits), **openai_schemas(limits)},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    if config.api_key:
        spec["security"] = [{"bearer": []}]
    return spec


def add_openapi_route(app: web.Application) -> None:
    """Serve GET /openapi.json on an app made by `server.create_app`."""
    state = app[STATE]
    app[_SPEC] = openapi_spec(state.config, state.limits, state.info,
                              serves_metrics=state.metrics is not None)
    app.router.add_get(OPENAPI_ROUTE, serve_openapi)


async def serve_openapi(request: web.Request) -> web.Response:
    """GET /openapi.json."""
    return web.json_response(request.app[_SPEC])
