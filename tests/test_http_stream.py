"""POST /generate_stream: server-sent events over an engine double playing scripted ids."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router_http_doubles import (MODEL_INFO, ScriptedEngine, router_config,
                                 token_events)
from shardgen.router.requests import FinishReason, GenerationError
from shardgen.router.server import create_app
from shardgen.router.tokenization import Tokenizer

PROMPT = "Once upon a time"
# Multi-byte characters split over byte tokens exercise the incremental detokenizer.
CONTINUATION = " Lily saw a big dog. 世界 She said: \"héllo!\" and ran home."


def ids_of(tokenizer: Tokenizer, text: str = CONTINUATION) -> list[int]:
    return tokenizer.hf(text, add_special_tokens=False)["input_ids"]


def parse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data:"):]) for line in text.splitlines()
            if line.startswith("data:")]


def run(tokenizer: Tokenizer, engine: ScriptedEngine, body: Any) -> Any:
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO)

    async def main() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await body(client)

    return asyncio.run(main())


def stream(tokenizer: Tokenizer, engine: ScriptedEngine, parameters: dict[str, Any]
           ) -> tuple[int, str, str]:
    async def body(client: TestClient) -> tuple[int, str, str]:
        response = await client.post("/generate_stream",
                                     json={"inputs": PROMPT, "parameters": parameters})
        return response.status, response.headers["Content-Type"], await response.text()

    return run(tokenizer, engine, body)


def test_one_event_per_token_then_the_text(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    status, content_type, text = stream(tokenizer, engine, {"max_new_tokens": len(ids)})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = parse_events(text)
    assert [e["index"] for e in events] == list(range(1, len(ids) + 1))
    assert [e["token"]["id"] for e in events] == ids
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    expected = tokenizer.hf.decode(ids, skip_special_tokens=True)
    last = events[-1]
    assert last["generated_text"] == expected
    assert "".join(e["token"]["text"] for e in events) == expected
    assert "\ufffd" not in "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": len(ids),
                               "seed": None,
                               "input_length": len(tokenizer.hf(PROMPT)["input_ids"])}


def test_stop_sequence_ends_the_stream_and_cancels(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    _, _, text = stream(tokenizer, engine, {"stop": ["dog."]})
    events = parse_events(text)
    full = tokenizer.hf.decode(ids)
    assert events[-1]["generated_text"] == full[:full.index("dog.") + len("dog.")]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert len(events) < len(ids)
    assert engine.handles[0].cancelled


def test_sampled_stream_reports_its_seed_and_top_tokens(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer, " The end")
    engine = ScriptedEngine(lambda request: token_events(ids))
    _, _, text = stream(tokenizer, engine, {"seed": 7, "top_k": 5, "top_n_tokens": 1})
    events = parse_events(text)
    assert events[-1]["details"]["seed"] == 7
    assert all(e["top_tokens"] == [] for e in events)


def test_a_client_that_goes_away_cancels_the_request(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer) * 20
    engine = ScriptedEngine(lambda request: token_events(ids), delay_s=0.02)

    async def body(client: TestClient) -> None:
        response = await client.post("/generate_stream", json={"inputs": PROMPT})
        assert (await response.content.readline()).startswith(b"data:")
        response.close()
        for _ in range(200):
            if engine.handles[0].cancelled:
                return
            await asyncio.sleep(0.01)

    run(tokenizer, engine, body)
    handle = engine.handles[0]
    assert handle.cancelled
    assert handle.yielded < len(ids)


def test_a_failure_before_the_first_token_is_a_424(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: [GenerationError("shard 0 failed: boom")])
    status, _, text = stream(tokenizer, engine, {})
    assert status == 424
    assert json.loads(text) == {"error": "shard 0 failed: boom", "error_type": "generation"}


def test_a_failure_mid_stream_is_an_error_event(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer, " The end of it")
    engine = ScriptedEngine(lambda request: [*token_events(ids)[:2],
                                             GenerationError("shard 1 failed: boom")])
    status, _, text = stream(tokenizer, engine, {})
    events = parse_events(text)
    assert status == 200
    assert [e["token"]["id"] for e in events[:-1]] == ids[:2]
    assert events[-1] == {"error": "shard 1 failed: boom", "error_type": "generation"}


def test_a_stream_ending_without_a_finish_reason_is_an_error(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer, " The end of it")
    engine = ScriptedEngine(lambda request: token_events(ids)[:2])
    _, _, text = stream(tokenizer, engine, {})
    assert parse_events(text)[-1]["error_type"] == "generation"


@pytest.mark.parametrize("parameters, field", [
    ({"decoder_input_details": True}, "decoder_input_details"),
    ({"best_of": 2, "do_sample": True}, "best_of"),
])
def test_what_a_stream_cannot_carry_is_refused(tokenizer: Tokenizer, parameters: dict[str, Any],
                                               field: str) -> None:
    engine = ScriptedEngine(lambda request: token_events([2], FinishReason.EOS_TOKEN))
    status, _, text = stream(tokenizer, engine, parameters)
    assert status == 422 and field in json.loads(text)["error"]
    assert engine.submitted == []
