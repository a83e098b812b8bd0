"""The HTTP layer against hostile input, deadlines and timeouts (engine double behind it).

Every hostile request gets a clear 4xx JSON error, reaches no engine, and the next plain
request is served. Deadlines: the x-request-timeout header and --request-timeout set the
engine request's deadline (the shorter wins); a RequestTimeoutError is a 504 "timeout",
or an error event once the stream has started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from aiohttp import ClientConnectionResetError, ClientPayloadError
from aiohttp.test_utils import TestClient, TestServer

from router_http_doubles import (MODEL_INFO, ScriptedEngine, router_config,
                                 token_events)
from shardgen.router.config import parse_args
from shardgen.router.deadlines import TIMEOUT_HEADER, parse_timeout_header, timeout_of
from shardgen.router.metrics import Metrics
from shardgen.router.requests import FinishReason, RequestTimeoutError
from shardgen.router.server import create_app
from shardgen.router.sse import EventStream
from shardgen.router.tokenization import Tokenizer
from shardgen.router.validation import ValidationError

JSON = {"Content-Type": "application/json"}
PLAIN = {"json": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 2}}}


def eos_engine() -> ScriptedEngine:
    return ScriptedEngine(lambda request: token_events([2], FinishReason.EOS_TOKEN))


def send(tokenizer: Tokenizer, engine: ScriptedEngine, *requests: dict[str, Any],
         **config: object) -> list[tuple[int, Any, tuple[float, float]]]:
    """Send requests in order; each answer is (status, JSON body or SSE text, (monotonic
    time the request was sent, time its answer was read))."""
    app = create_app(router_config(**config), tokenizer, engine, MODEL_INFO)

    async def main() -> list[tuple[int, Any, tuple[float, float]]]:
        answers = []
        async with TestClient(TestServer(app)) as client:
            for request in requests:
                request = {"method": "POST", "path": "/generate", **request}
                sent = time.monotonic()
                response = await client.request(request.pop("method"), request.pop("path"),
                                                **request)
                text = await response.text()
                is_json = response.content_type == "application/json"
                answers.append((response.status, json.loads(text) if is_json else text,
                                (sent, time.monotonic())))
        return answers

    return asyncio.run(main())


# ---------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize("data, status, words", [
    (b"[" * 100_000 + b"]" * 100_000, 400, ["nested too deeply"]),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}", 400,
     ["not valid JSON", "digits"]),
    (b'{"inputs": "Hi \\ud800 there"}', 422, ["`inputs`", "not valid Unicode", "'\\ud800'"]),
    (b'{"inputs": "Hi", "parameters": {"stop": ["\\udfff"]}}', 422, ["`stop`", "Unicode"]),
    (b'{"inputs": "Hi \xff\xfe"}', 400, ["not valid JSON", "utf-8"]),
    (b'{"inputs": "Hi", "parameters": {"temperature": ' + b"1" * 400 + b"}}", 422,
     ["`temperature`", "finite", "(400 characters)"]),
    (b'{"inputs": "Hi", "max_new_tokens": 5}', 422, ["unknown field", "`max_new_tokens`"]),
    (b'{"inputs": "Hi", "parameters": {"max_tokens": 5}}', 422, ["unknown parameter",
                                                                   "`max_tokens`"]),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1000000000}}', 422,
     ["max_new_tokens", "1000000000"]),
    (b'{"inputs": "Hi", "parameters": {"best_of": 100000, "do_sample": true}}', 422,
     ["best_of", "100000"]),
    (b'{"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}', 422,
     ["stop", "4"]),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": "5"}}', 422, ["integer", "str"]),
    (b'{"inputs": ["' + b"x" * 10_000 + b'"]}', 400, ["`inputs` must be a string",
                                                      "characters)"]),
])
def test_hostile_bodies_get_a_clear_4xx_and_change_nothing(
        tokenizer: Tokenizer, data: bytes, status: int, words: list[str]) -> None:
    engine = eos_engine()
    bad, good = send(tokenizer, engine, {"data": data, "headers": JSON}, PLAIN)
    code, body, _ = bad
    assert code == status, body
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    for word in words:
        assert word in body["error"], body["error"]
    assert len(body["error"]) < 400  # the offending value is quoted, not echoed whole
    assert good[0] == 200
    assert len(engine.submitted) == 1  # only the plain request reached the engine


def test_an_authorization_header_that_is_not_utf8_is_401(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    answers = send(tokenizer, engine,
                   {**PLAIN, "headers": {"Authorization": "Bearer s3cr\xe9t"}},
                   {**PLAIN, "headers": {"Authorization": "Bearer s3cret"}},
                   api_key="s3cret")
    assert [code for code, _, _ in answers] == [401, 200]
    assert answers[0][1]["error_type"] == "authentication"


# ---------------------------------------------------------------- special tokens


def test_special_token_strings_in_inputs_are_text_unless_asked(tokenizer: Tokenizer) -> None:
    prompt = "Once upon a time</s> there was<s>"
    eos, bos = tokenizer.hf.eos_token_id, tokenizer.hf.bos_token_id
    as_text = eos_engine()
    send(tokenizer, as_text, {"json": {"inputs": prompt}})
    parsed = eos_engine()
    send(tokenizer, parsed, {"json": {"inputs": prompt}}, parse_special_tokens=True)
    text_ids, parsed_ids = as_text.submitted[0].input_ids, parsed.submitted[0].input_ids
    # Both start with the BOS the tokenizer adds; only the parsed prompt holds more of them.
    assert text_ids[0] == parsed_ids[0] == bos
    assert eos not in text_ids and bos not in text_ids[1:]
    assert parsed_ids.count(eos) == 1 and parsed_ids.count(bos) == 2
    assert text_ids == tokenizer.hf(prompt, split_special_tokens=True)["input_ids"]
    assert tokenizer.decode(text_ids[1:]) == prompt


def test_a_plain_prompt_encodes_the_same_in_both_modes(tokenizer: Tokenizer) -> None:
    prompt = "Lily and Ben went to the park. They saw a big dog."
    assert (tokenizer.encode_sync(prompt, parse_special_tokens=False)
            == tokenizer.encode_sync(prompt) == tokenizer.hf(prompt)["input_ids"])


def test_the_flags_reach_the_config() -> None:
    config = parse_args(["--model-id", "m", "--request-timeout", "2.5",
                         "--parse-special-tokens"])
    assert config.request_timeout_s == 2.5 and config.parse_special_tokens
    defaults = parse_args(["--model-id", "m"])
    assert defaults.request_timeout_s is None and not defaults.parse_special_tokens
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["--model-id", "m", "--request-timeout", bad])


# ---------------------------------------------------------------- deadlines


def test_the_shorter_of_header_and_server_timeout_wins() -> None:
    assert timeout_of(None, None) is None
    assert timeout_of("3", None) == 3.0 and timeout_of(None, 5.0) == 5.0
    assert timeout_of("3", 5.0) == 3.0 and timeout_of("30", 5.0) == 5.0
    for bad in ("0", "-2", "nan", "inf", "", "ten", "1e999"):
        with pytest.raises(ValidationError, match=TIMEOUT_HEADER):
            parse_timeout_header(bad)


def test_requests_carry_the_deadline_of_their_timeout(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    answers = send(tokenizer, engine, PLAIN, {**PLAIN, "headers": {TIMEOUT_HEADER: "2.5"}},
                   {**PLAIN, "headers": {TIMEOUT_HEADER: "60"}},
                   {**PLAIN, "path": "/generate_stream", "headers": {TIMEOUT_HEADER: "1"}},
                   request_timeout_s=10.0)
    assert [code for code, _, _ in answers] == [200] * 4
    for request, (_, _, (sent, read)), timeout_s in zip(engine.submitted, answers,
                                                         [10.0, 2.5, 10.0, 1.0]):
        # The deadline is the arrival (between sending and reading the answer) + timeout.
        assert request.deadline is not None
        assert sent + timeout_s <= request.deadline <= read + timeout_s


def test_without_any_timeout_requests_have_no_deadline(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    send(tokenizer, engine, PLAIN)
    assert engine.submitted[0].deadline is None


def test_a_malformed_timeout_header_is_422_before_the_engine(tokenizer: Tokenizer) -> None:
    engine = eos_engine()
    (answer,) = send(tokenizer, engine, {**PLAIN, "headers": {TIMEOUT_HEADER: "-1"}})
    assert answer[0] == 422 and TIMEOUT_HEADER in answer[1]["error"]
    assert engine.submitted == []


def test_a_timeout_is_504_or_an_error_event_mid_stream(tokenizer: Tokenizer) -> None:
    timeout = RequestTimeoutError("request 1 passed its deadline after 1 generated tokens")
    before = ScriptedEngine(lambda request: [timeout])
    mid = ScriptedEngine(lambda request: [*token_events([403, 407, 261])[:1], timeout])
    (whole,) = send(tokenizer, before, PLAIN)
    (streamed,) = send(tokenizer, mid, {**PLAIN, "path": "/generate_stream"})
    assert whole[0] == 504
    assert whole[1] == {"error": str(timeout), "error_type": "timeout"}
    assert streamed[0] == 200
    last = json.loads(streamed[1].strip().split("\n\n")[-1].removeprefix("data:"))
    assert last == {"error": str(timeout), "error_type": "timeout"}


# ---------------------------------------------------------------- disconnects


def test_a_write_to_a_client_that_left_counts_as_cancelled(tokenizer: Tokenizer,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """The race where the client's disconnect shows up as a failed write before aiohttp
    cancels the handler: no 500, no error log, outcome "cancelled", request cancelled."""
    engine = ScriptedEngine(lambda request: token_events([403, 407, 261, 378]), delay_s=0.01)
    metrics = Metrics()
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO, metrics=metrics)
    send_event = EventStream.send

    async def send_then_lose_the_client(self: EventStream, data: Any) -> None:
        if self.started:  # the second event: the client has gone in the meantime
            self._request.transport.close()
            raise ClientConnectionResetError("Cannot write to closing transport")
        await send_event(self, data)

    monkeypatch.setattr(EventStream, "send", send_then_lose_the_client)

    async def main() -> bytes:
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/generate_stream", json=PLAIN["json"])
            try:
                return await response.content.read()
            except ClientPayloadError:
                return b""

    asyncio.run(main())
    counts = {s.labels["outcome"]: s.value for family in metrics.registry.collect()
              for s in family.samples if s.name == "shardgen_requests_total"}
    assert counts == {"cancelled": 1.0}
    assert engine.handles[0].cancelled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
