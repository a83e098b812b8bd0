"""Error answers of the HTTP layer: status codes, JSON shape, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router_http_doubles import (MODEL_INFO, ScriptedEngine, router_config,
                                 token_events)
from shardgen.router.requests import FinishReason, QueueFullError
from shardgen.router.server import create_app, stop_accepting
from shardgen.router.tokenization import Tokenizer


def eos_engine(**kwargs: Any) -> ScriptedEngine:
    return ScriptedEngine(lambda request: token_events([2], FinishReason.EOS_TOKEN), **kwargs)


def send(tokenizer: Tokenizer, engine: ScriptedEngine, *requests: dict[str, Any],
         draining: bool = False, **config: object) -> list[tuple[int, Any]]:
    """Send requests ({"method", "path", "json" | "data", "headers"}) in order."""
    app = create_app(router_config(**config), tokenizer, engine, MODEL_INFO)
    if draining:
        stop_accepting(app)

    async def main() -> list[tuple[int, Any]]:
        answers = []
        async with TestClient(TestServer(app)) as client:
            for request in requests:
                request = {"method": "POST", "path": "/generate", **request}
                response = await client.request(request.pop("method"), request.pop("path"),
                                                **request)
                text = await response.text()
                answers.append((response.status, json.loads(text) if text else None))
        return answers

    return asyncio.run(main())


def assert_error(answer: tuple[int, Any], status: int, error_type: str, *words: str) -> None:
    code, body = answer
    assert code == status, body
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    for word in words:
        assert word in body["error"], body["error"]


@pytest.mark.parametrize("data, words", [
    (b"{not json", ["JSON"]),
    (b"[1, 2]", ["object"]),
    (b'{"parameters": {}}', ["inputs"]),
    (b'{"inputs": 42}', ["inputs", "int"]),
    (b'{"inputs": "Hi", "parameters": [1]}', ["parameters"]),
    ("{\"inputs\": \"caf\xe9\"}".encode("latin-1"), ["JSON"]),
])
def test_malformed_bodies_are_400(tokenizer: Tokenizer, data: bytes, words: list[str]) -> None:
    engine = eos_engine()
    (answer,) = send(tokenizer, engine, {"data": data,
                                        "headers": {"Content-Type": "application/json"}})
    assert_error(answer, 400, "validation", *words)
    assert engine.submitted == []


@pytest.mark.parametrize("parameters, words", [
    ({"temperature": 0.0}, ["temperature", "0.0"]),
    ({"temperature": "hot"}, ["temperature", "number"]),
    ({"top_p": 1.0}, ["top_p", "1.0"]),
    ({"max_new_tokens": 0}, ["max_new_tokens", "0"]),
    ({"max_new_tokens": 10**6}, ["max_new_tokens", "1000000", "512"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, ["stop", "4", "5"]),
    ({"top_n_tokens": 6}, ["top_n_tokens", "5", "6"]),
    ({"truncate": 600}, ["truncate", "511", "600"]),
    ({"grammar": {"type": "json"}}, ["grammar"]),
    ({"max_tokens": 5}, ["max_tokens"]),
])
def test_bad_parameters_are_422_naming_field_and_limit(tokenizer: Tokenizer,
                                                        parameters: dict[str, Any],
                                                        words: list[str]) -> None:
    engine = eos_engine()
    (answer,) = send(tokenizer, engine, {"json": {"inputs": "Hi", "parameters": parameters}})
    assert_error(answer, 422, "validation", *words)
    assert engine.submitted == []


def test_empty_inputs_are_422(tokenizer: Tokenizer) -> None:
    (answer,) = send(tokenizer, eos_engine(), {"json": {"inputs": ""}})
    assert_error(answer, 422, "validation", "inputs")


def test_a_prompt_over_max_input_tokens_is_422_naming_both(tokenizer: Tokenizer) -> None:
    prompt = "Lily and Ben went to the park. " * 3
    length = len(tokenizer.hf(prompt)["input_ids"])
    (answer,) = send(tokenizer, eos_engine(), {"json": {"inputs": prompt}},
                     max_input_tokens=length - 1, max_total_tokens=100)
    assert_error(answer, 422, "validation", "inputs", str(length), str(length - 1))


def test_a_body_over_the_payload_limit_is_413(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    (answer,) = send(tokenizer, engine, {"json": {"inputs": "x" * 2000}}, payload_limit=1000)
    assert_error(answer, 413, "validation", "1000")
    assert engine.submitted == []


def test_a_full_engine_is_429_and_a_prompt_that_never_fits_is_422(tokenizer: Tokenizer) -> None:
    full = send(tokenizer, eos_engine(max_requests=1),
                {"json": {"inputs": "Hi"}}, {"json": {"inputs": "Hi"}})
    assert full[0][0] == 200
    assert_error(full[1], 429, "overloaded", "max_concurrent_requests")
    engine = eos_engine(submit_error=ValueError("needs 40 KV blocks; the cache has 32"))
    (never,) = send(tokenizer, engine, {"json": {"inputs": "Hi"}})
    assert_error(never, 422, "validation", "40", "32")


def test_while_draining_new_requests_get_503_and_health_stays_up(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    generate, stream, ready, health = send(
        tokenizer, engine, {"json": {"inputs": "Hi"}},
        {"path": "/generate_stream", "json": {"inputs": "Hi"}},
        {"method": "GET", "path": "/ready"}, {"method": "GET", "path": "/health"},
        draining=True)
    assert_error(generate, 503, "unavailable")
    assert_error(stream, 503, "unavailable")
    assert_error(ready, 503, "unavailable")
    assert health[0] == 200
    assert engine.submitted == []


def test_queue_full_while_draining_is_503(tokenizer: Tokenizer) -> None:
    # Requests that passed validation before draining began meet a closed engine.
    engine = eos_engine(submit_error=QueueFullError("the server is shutting down"))
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO)

    def submit(request: Any) -> Any:
        stop_accepting(app)
        raise QueueFullError("the server is shutting down")

    engine.submit = submit  # type: ignore[method-assign]

    async def main() -> tuple[int, Any]:
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/generate", json={"inputs": "Hi"})
            return response.status, await response.json()

    assert_error(asyncio.run(main()), 503, "unavailable")


def test_api_key_guards_the_api_but_not_the_probes(tokenizer: Tokenizer) -> None:
    answers = send(
        tokenizer, eos_engine(),
        {"json": {"inputs": "Hi"}},
        {"json": {"inputs": "Hi"}, "headers": {"Authorization": "Bearer wrong"}},
        {"json": {"inputs": "Hi"}, "headers": {"Authorization": "Bearer s3cret"}},
        {"method": "GET", "path": "/health"}, {"method": "GET", "path": "/ready"},
        {"method": "GET", "path": "/info"},
        api_key="s3cret")
    assert_error(answers[0], 401, "authentication")
    assert_error(answers[1], 401, "authentication")
    assert [code for code, _ in answers[2:]] == [200, 200, 200, 401]


def test_unknown_routes_and_methods_get_json_errors(tokenizer: Tokenizer) -> None:
    missing, wrong_method = send(tokenizer, eos_engine(), {"path": "/nope", "json": {}},
                                 {"method": "GET", "path": "/generate"})
    assert_error(missing, 404, "http")
    assert_error(wrong_method, 405, "http")


def test_the_server_keeps_serving_after_errors(tokenizer: Tokenizer) -> None:
    answers = send(tokenizer, eos_engine(), {"data": b"{"}, {"json": {"inputs": ""}},
                   {"json": {"inputs": "Hi", "parameters": {"top_k": -1}}},
                   {"json": {"inputs": "Hi"}})
    assert [code for code, _ in answers] == [400, 422, 422, 200]
