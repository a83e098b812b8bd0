"""Request ids (x-request-id) and explicit cancellation (DELETE /v1/requests/{id})."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from api_http_helpers import Answer, app_for, call, fetch, serve
from router_http_doubles import ScriptedEngine, token_events
from shardgen.router.tokenization import Tokenizer

BODY = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 20}}
CHAT = {"prompt": "Once upon a time", "max_tokens": 20}


def slow_engine(**kwargs: object) -> ScriptedEngine:
    """Twenty tokens, 50 ms apart: a request that runs for a second unless cancelled."""
    return ScriptedEngine(lambda request: token_events(list(range(10, 30))), delay_s=0.05,
                          **kwargs)


def test_every_response_names_its_request(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([5]))
    given = call(tokenizer, engine, "POST", "/generate", BODY, {"x-request-id": "client:id-1.a"})
    assert given.headers["x-request-id"] == "client:id-1.a"
    made = call(tokenizer, engine, "POST", "/generate", BODY)
    assert len(made.headers["x-request-id"]) == 32
    # An id the server cannot honour is replaced, not refused.
    replaced = call(tokenizer, engine, "POST", "/generate", BODY, {"x-request-id": "a b/c"})
    assert replaced.status == 200 and replaced.headers["x-request-id"] != "a b/c"
    error = call(tokenizer, engine, "POST", "/generate", {"inputs": ""}, {"x-request-id": "e"})
    assert error.status == 422 and error.headers["x-request-id"] == "e"
    stream = call(tokenizer, engine, "POST", "/generate_stream", BODY, {"x-request-id": "s"})
    assert stream.headers["x-request-id"] == "s"


async def _cancel_while_running(client: TestClient, path: str, body: dict,
                                request_id: str) -> tuple[Answer, Answer]:
    running = asyncio.ensure_future(fetch(client, "POST", path, json=body,
                                          headers={"x-request-id": request_id}))
    await asyncio.sleep(0.2)  # a few tokens in
    cancelled = await fetch(client, "DELETE", f"/v1/requests/{request_id}")
    return await running, cancelled


@pytest.mark.parametrize("path, body", [("/generate", BODY), ("/v1/completions", CHAT)])
def test_delete_cancels_a_running_request_with_499(tokenizer: Tokenizer, path: str,
                                                   body: dict) -> None:
    engine = slow_engine()
    answer, cancelled = serve(app_for(tokenizer, engine),
                              lambda client: _cancel_while_running(client, path, body, "r1"))
    assert cancelled.status == 200
    assert cancelled.json() == {"request_id": "r1", "cancelled": True, "engine_requests": 1}
    assert answer.status == 499, answer.text
    assert answer.json()["error_type"] == "cancelled"
    (handle,) = engine.handles
    assert handle.cancelled and handle.yielded < 20


@pytest.mark.parametrize("path, body, kind", [
    ("/generate_stream", BODY, "tgi"),
    ("/v1/completions", {**CHAT, "stream": True, "n": 2}, "openai")])
def test_delete_ends_a_stream_with_a_cancelled_event(tokenizer: Tokenizer, path: str,
                                                     body: dict, kind: str) -> None:
    engine = slow_engine()
    answer, cancelled = serve(app_for(tokenizer, engine),
                              lambda client: _cancel_while_running(client, path, body, "s1"))
    assert answer.status == 200 and cancelled.status == 200
    events = [event for event in answer.events() if event != "[DONE]"]
    error = events[-1]
    assert error["error_type"] == "cancelled"
    assert "s1" in (error["error"] if kind == "tgi" else error["error"]["message"])
    assert all(handle.cancelled for handle in engine.handles)
    assert cancelled.json()["engine_requests"] == len(engine.handles)


def test_an_unknown_or_finished_request_is_404(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([5]))

    async def body(client: TestClient) -> tuple[Answer, Answer]:
        await fetch(client, "POST", "/generate", json=BODY, headers={"x-request-id": "done"})
        return (await fetch(client, "DELETE", "/v1/requests/done"),
                await fetch(client, "DELETE", "/v1/requests/never"))

    finished, unknown = serve(app_for(tokenizer, engine), body)
    assert finished.status == unknown.status == 404
    assert unknown.json()["error_type"] == "not_found" and "never" in unknown.json()["error"]


def test_a_running_id_cannot_be_reused_until_it_ends(tokenizer: Tokenizer) -> None:
    engine = slow_engine()

    async def body(client: TestClient) -> tuple[Answer, Answer, Answer]:
        first = asyncio.ensure_future(fetch(client, "POST", "/generate", json=BODY,
                                            headers={"x-request-id": "same"}))
        await asyncio.sleep(0.1)
        second = await fetch(client, "POST", "/generate", json=BODY,
                             headers={"x-request-id": "same"})
        done = await first
        third = await fetch(client, "POST", "/generate", json=BODY,
                            headers={"x-request-id": "same"})
        return done, second, third

    done, second, third = serve(app_for(tokenizer, engine), body)
    assert done.status == 200 and third.status == 200
    assert second.status == 422 and "same" in second.json()["error"]
    assert len(engine.submitted) == 2  # the refused one never reached the engine


def test_delete_needs_the_api_key(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([5]))
    answer = call(tokenizer, engine, "DELETE", "/v1/requests/x", api_key="secret")
    assert answer.status == 401
