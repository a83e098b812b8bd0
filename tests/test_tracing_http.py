"""The router's span per HTTP request: the caller's traceparent, route, status, token counts,
and the validate/tokenize children; probes untraced; the context handed to the engine."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from router_http_doubles import MODEL_INFO, ScriptedEngine, router_config, token_events
from shardgen.router import http_spans
from shardgen.router.requests import FinishReason
from shardgen.router.server import create_app
from shardgen.router.tokenization import Tokenizer
from tracing_capture import capture_spans, is_child, named, only

# A client's span: trace 0af7…, span b7ad… (W3C's example), sampled.
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def serve(engine: ScriptedEngine, tokenizer: Tokenizer,
          calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]]) -> list[int]:
    """Answer the calls (method, path, json, headers) in order; their statuses."""
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO)

    async def main() -> list[int]:
        statuses = []
        async with TestClient(TestServer(app)) as client:
            for method, path, body, headers in calls:
                response = await client.request(method, path, json=body, headers=headers)
                await response.read()
                statuses.append(response.status)
        return statuses

    return asyncio.run(main())


def test_a_generate_request_continues_the_callers_trace(tokenizer: Tokenizer) -> None:
    exporter = capture_spans()
    generated = tokenizer.hf(" Lily ran home.", add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(lambda request: token_events(generated, FinishReason.EOS_TOKEN))
    prompt = "Once upon a time"
    statuses = serve(engine, tokenizer, [
        ("POST", "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 9}},
         {"traceparent": TRACEPARENT})])
    assert statuses == [200]
    spans = exporter.get_finished_spans()
    request = only(spans, "POST /generate")
    assert request.kind == SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == CLIENT_TRACE
    assert request.parent is not None and format(request.parent.span_id, "016x") == CLIENT_SPAN
    attributes = request.attributes or {}
    prompt_tokens = len(tokenizer.hf(prompt)["input_ids"])
    assert attributes[http_spans.HTTP_ROUTE] == "/generate"
    assert attributes[http_spans.HTTP_STATUS] == 200
    assert attributes[http_spans.INPUT_TOKENS] == prompt_tokens
    assert attributes[http_spans.MAX_TOKENS] == 9
    assert attributes[http_spans.OUTPUT_TOKENS] == len(generated)
    assert attributes[http_spans.FINISH_REASON] == "eos_token"
    assert attributes[http_spans.OUTCOME] == "success"
    validate, tokenize = only(spans, "validate"), only(spans, "tokenize")
    assert is_child(validate, request) and is_child(tokenize, validate)
    # The engine gets the request span's context: its spans continue this trace.
    handed = trace.get_current_span(engine.submitted[0].trace_context).get_span_context()
    assert handed.span_id == request.context.span_id


def test_errors_carry_their_status_and_outcome(tokenizer: Tokenizer) -> None:
    exporter = capture_spans()
    engine = ScriptedEngine(lambda request: token_events([5, 6]))
    statuses = serve(engine, tokenizer, [
        ("POST", "/generate", {"inputs": ""}, {}),
        ("POST", "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, {}),
        ("POST", "/", {"inputs": "Hi", "stream": True}, {})])
    assert statuses == [422, 422, 200]
    spans = exporter.get_finished_spans()
    generate, stream = only(spans, "POST /generate"), only(spans, "POST /generate_stream")
    compat = only(spans, "POST /")
    for span in (generate, stream):
        assert (span.attributes or {})[http_spans.HTTP_STATUS] == 422
        assert (span.attributes or {})[http_spans.OUTCOME] == "validation"
        # A client's mistake is not the server's failure.
        assert span.status.status_code != StatusCode.ERROR
    # The validation error shows on the child that raised it.
    failed = [span for span in named(spans, "validate")
              if span.status.status_code == StatusCode.ERROR]
    assert {span.parent.span_id for span in failed if span.parent} == {
        generate.context.span_id, stream.context.span_id}
    assert (compat.attributes or {})[http_spans.OUTPUT_TOKENS] == 2
    assert (compat.attributes or {})[http_spans.HTTP_ROUTE] == "/"


def test_probes_and_metrics_get_no_span(tokenizer: Tokenizer) -> None:
    exporter = capture_spans()
    engine = ScriptedEngine(lambda request: token_events([5]))
    statuses = serve(engine, tokenizer, [("GET", "/health", None, {}), ("GET", "/ready", None, {}),
                                         ("GET", "/info", None, {})])
    assert statuses == [200, 200, 200]
    names: list[str] = [span.name for span in exporter.get_finished_spans()]
    assert names == ["GET /info"]


def test_a_client_that_goes_away_is_no_server_error(tokenizer: Tokenizer) -> None:
    exporter = capture_spans()
    engine = ScriptedEngine(lambda request: token_events(list(range(5, 25))), delay_s=0.05)
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO)

    async def main() -> None:
        # handler_cancellation as in the router's main: a gone client cancels its handler.
        async with TestClient(TestServer(app, handler_cancellation=True)) as client:
            response = await client.post("/generate_stream", json={"inputs": "Hi"})
            await response.content.readline()  # the first event arrived
            response.close()
            for _ in range(100):
                if exporter.get_finished_spans():
                    return
                await asyncio.sleep(0.02)

    asyncio.run(main())
    request = only(exporter.get_finished_spans(), "POST /generate_stream")
    assert (request.attributes or {})[http_spans.OUTCOME] == "cancelled"
    assert request.status.status_code != StatusCode.ERROR
    assert engine.handles[0].cancelled
