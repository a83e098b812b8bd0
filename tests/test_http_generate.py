"""POST /generate (and TGI's `/` route) over an engine double that plays scripted token ids.

Expected texts come from the Hugging Face tokenizer itself (`decode` of the scripted ids),
never from strings written here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router_http_doubles import (MODEL_INFO, ScriptedEngine, router_config,
                                 token_events)
from shardgen.router.requests import FinishReason, PrefillEvent, TokenEvent
from shardgen.router.server import create_app
from shardgen.router.tokenization import Tokenizer

PROMPT = "Once upon a time"
CONTINUATION = ", there was a little girl named Lily. She liked to play outside."
EOS = 2


def continuation_ids(tokenizer: Tokenizer, text: str = CONTINUATION) -> list[int]:
    return tokenizer.hf(text, add_special_tokens=False)["input_ids"]


def serve(tokenizer: Tokenizer, engine: ScriptedEngine,
          body: Callable[[TestClient], Awaitable[Any]], **config: object) -> Any:
    """Run body(client) against an app over engine."""
    app = create_app(router_config(**config), tokenizer, engine, MODEL_INFO)

    async def run() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await body(client)

    return asyncio.run(run())


def post(tokenizer: Tokenizer, engine: ScriptedEngine, json: object, path: str = "/generate",
         **config: object) -> tuple[int, Any]:
    async def body(client: TestClient) -> tuple[int, Any]:
        response = await client.post(path, json=json)
        return response.status, await response.json()

    return serve(tokenizer, engine, body, **config)


def test_text_and_details_match_the_tokenizer(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    status, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "max_new_tokens": len(ids), "details": True}})
    assert status == 200, body
    assert body["generated_text"] == tokenizer.hf.decode(ids, skip_special_tokens=True)
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == len(ids)
    assert details["seed"] is None  # greedy
    assert details["prefill"] == []
    assert [t["id"] for t in details["tokens"]] == ids
    assert [t["logprob"] for t in details["tokens"]] == [e.logprob for e in token_events(ids)]
    assert not any(t["special"] for t in details["tokens"])
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
    assert "top_tokens" not in details


def test_the_engine_gets_the_prompt_as_transformers_tokenizes_it(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([EOS], FinishReason.EOS_TOKEN))
    status, _ = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 7, "repetition_penalty": 1.3, "ignore_eos": True, "top_n_tokens": 2}})
    assert status == 200
    (request,) = engine.submitted
    assert request.input_ids == tokenizer.hf(PROMPT)["input_ids"]
    assert request.input_ids[0] == tokenizer.hf.bos_token_id
    assert request.stopping.max_new_tokens == 7
    assert request.stopping.ignore_eos_token is True
    assert request.sampling.repetition_penalty == pytest.approx(1.3)
    assert request.sampling.do_sample is False
    assert request.top_n_tokens == 2


def test_eos_is_a_special_token_left_out_of_the_text(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer, " She smiled.") + [EOS]
    engine = ScriptedEngine(lambda request: token_events(ids, FinishReason.EOS_TOKEN))
    status, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {"details": True}})
    assert status == 200
    assert body["generated_text"] == tokenizer.hf.decode(ids, skip_special_tokens=True)
    assert body["details"]["finish_reason"] == "eos_token"
    last = body["details"]["tokens"][-1]
    assert last["special"] is True and last["id"] == EOS
    assert last["text"] == tokenizer.hf.decode([EOS])


def test_details_are_absent_unless_asked(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events(continuation_ids(tokenizer)))
    status, body = post(tokenizer, engine, {"inputs": PROMPT})
    assert status == 200 and set(body) == {"generated_text"}


def test_default_max_new_tokens_is_lowered_to_fit(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([EOS], FinishReason.EOS_TOKEN))
    prompt_len = len(tokenizer.hf(PROMPT)["input_ids"])
    post(tokenizer, engine, {"inputs": PROMPT}, default_max_new_tokens=9)
    post(tokenizer, engine, {"inputs": PROMPT}, max_total_tokens=prompt_len + 3)
    assert [r.stopping.max_new_tokens for r in engine.submitted] == [9, 3]


def test_stop_sequence_cuts_after_it_and_cancels_the_request(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    status, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "stop": ["Lily", "little"], "details": True}})
    assert status == 200
    full = tokenizer.hf.decode(ids, skip_special_tokens=True)
    assert body["generated_text"] == full[:full.index("little") + len("little")]
    assert body["details"]["finish_reason"] == "stop_sequence"
    (handle,) = engine.handles
    assert handle.cancelled
    streamed = len(body["details"]["tokens"])
    assert streamed < len(ids)
    assert "little" in tokenizer.hf.decode(ids[:streamed])
    assert "little" not in tokenizer.hf.decode(ids[:streamed - 1])


def test_a_stop_sequence_ending_inside_a_token_cuts_that_token(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    _, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "stop": ["litt"], "details": True}})
    full = tokenizer.hf.decode(ids)
    assert body["generated_text"] == full[:full.index("litt") + len("litt")]
    # The token keeps its whole text; only generated_text is cut.
    assert body["details"]["tokens"][-1]["text"].endswith("little")


def test_sampling_parameters_imply_sampling_and_report_a_seed(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([EOS], FinishReason.EOS_TOKEN))
    _, drawn = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "temperature": 0.7, "details": True}})
    _, given = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "do_sample": True, "seed": 1234, "details": True}})
    first, second = engine.submitted
    assert first.sampling.do_sample and first.sampling.temperature == pytest.approx(0.7)
    assert drawn["details"]["seed"] == first.sampling.seed
    assert second.sampling.seed == 1234 and given["details"]["seed"] == 1234


def test_return_full_text_puts_the_prompt_in_front(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    _, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "return_full_text": True}})
    assert body["generated_text"] == PROMPT + tokenizer.hf.decode(ids)


def test_truncate_keeps_the_last_prompt_tokens(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([EOS], FinishReason.EOS_TOKEN))
    prompt = "Lily and Ben went to the park. They played on the swings all day."
    post(tokenizer, engine, {"inputs": prompt, "parameters": {"truncate": 5}})
    assert engine.submitted[0].input_ids == tokenizer.hf(prompt)["input_ids"][-5:]


def test_decoder_input_details_report_prompt_logprobs(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.hf(PROMPT)["input_ids"]
    logprobs = [-1.0 - i for i in range(len(prompt_ids) - 1)]

    def script(request: Any) -> list[Any]:
        assert request.prefill_logprobs
        return [PrefillEvent(tuple(request.input_ids), tuple(logprobs)),
                *token_events([EOS], FinishReason.EOS_TOKEN)]

    _, body = post(tokenizer, ScriptedEngine(script), {"inputs": PROMPT, "parameters": {
        "decoder_input_details": True}})
    prefill = body["details"]["prefill"]
    assert [t["id"] for t in prefill] == prompt_ids
    assert [t["logprob"] for t in prefill] == [None, *logprobs]
    assert [t["text"] for t in prefill] == [tokenizer.hf.decode([i]) for i in prompt_ids]


def test_top_tokens_come_with_each_token(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer, " The end")
    events = [TokenEvent(id=i, logprob=-0.1, top_tokens=((i, -0.1), (EOS, -3.0)),
                         finish_reason=FinishReason.LENGTH if n == len(ids) - 1 else None)
              for n, i in enumerate(ids)]
    _, body = post(tokenizer, ScriptedEngine(lambda request: events), {
        "inputs": PROMPT, "parameters": {"top_n_tokens": 2, "details": True}})
    top = body["details"]["top_tokens"]
    assert len(top) == len(ids)
    for token_id, alternatives in zip(ids, top):
        assert [a["id"] for a in alternatives] == [token_id, EOS]
        assert alternatives[1] == {"id": EOS, "text": tokenizer.hf.decode([EOS]),
                                   "logprob": -3.0, "special": True}


def test_best_of_runs_several_seeds_and_keeps_the_likeliest(tokenizer: Tokenizer) -> None:
    likely = continuation_ids(tokenizer, " It was sunny.")
    unlikely = continuation_ids(tokenizer, " It rained.")

    def script(request: Any) -> list[Any]:
        # The first submitted sample is the unlikely one: the ranking must reorder.
        if len(engine.submitted) == 1:
            return token_events(unlikely, logprob=-5.0)
        return token_events(likely, logprob=-0.1)

    engine = ScriptedEngine(script)
    status, body = post(tokenizer, engine, {"inputs": PROMPT, "parameters": {
        "best_of": 2, "do_sample": True, "details": True}})
    assert status == 200, body
    seeds = [r.sampling.seed for r in engine.submitted]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    assert body["generated_text"] == tokenizer.hf.decode(likely)
    assert body["details"]["seed"] == seeds[1]
    (other,) = body["details"]["best_of_sequences"]
    assert other["generated_text"] == tokenizer.hf.decode(unlikely)
    assert other["seed"] == seeds[0]


def test_compat_route_serves_both_shapes(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer, " The end")
    engine = ScriptedEngine(lambda request: token_events(ids))

    async def body(client: TestClient) -> tuple[Any, str]:
        plain = await (await client.post("/", json={"inputs": PROMPT})).json()
        streamed = await client.post("/", json={"inputs": PROMPT, "stream": True})
        return plain, await streamed.text()

    plain, streamed = serve(tokenizer, engine, body)
    assert plain["generated_text"] == tokenizer.hf.decode(ids)
    assert streamed.count("data:") == len(ids)


def test_info_reports_the_model_and_the_limits(tokenizer: Tokenizer) -> None:
    async def body(client: TestClient) -> Any:
        return await (await client.get("/info")).json()

    info = serve(tokenizer, ScriptedEngine(lambda r: []), body, max_input_tokens=100,
                 max_total_tokens=200)
    assert info["model_id"] == MODEL_INFO.model_id
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (100, 200)
    assert info["max_batch_total_tokens"] == 4096
    assert info["block_size"] == 16 and info["num_shard"] == 1
    assert info["router"] == "shardgen"
    for key in ("max_concurrent_requests", "max_best_of", "max_stop_sequences",
                "max_batch_prefill_tokens", "waiting_served_ratio", "max_waiting_tokens",
                "version"):
        assert key in info


def test_a_client_that_goes_away_cancels_the_request(tokenizer: Tokenizer) -> None:
    ids = continuation_ids(tokenizer) * 20
    engine = ScriptedEngine(lambda request: token_events(ids), delay_s=0.02)

    async def body(client: TestClient) -> None:
        request = asyncio.ensure_future(client.post("/generate", json={"inputs": PROMPT}))
        while not engine.handles or engine.handles[0].yielded < 2:
            await asyncio.sleep(0.01)
        request.cancel()  # the client closes its connection mid-generation
        for _ in range(200):
            if engine.handles[0].cancelled:
                return
            await asyncio.sleep(0.01)

    serve(tokenizer, engine, body)
    assert engine.handles[0].cancelled
    assert engine.handles[0].yielded < len(ids)
