"""Per-request metrics recorded by the HTTP layer and served on GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from router_http_doubles import (MODEL_INFO, ScriptedEngine, router_config,
                                 token_events)
from shardgen.router.metrics import Metrics
from shardgen.router.request_metrics import RequestTimer
from shardgen.router.requests import GenerationError
from shardgen.router.server import create_app
from shardgen.router.tokenization import Tokenizer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_are_counted_and_timed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.hf(" Lily ran home.", add_special_tokens=False)["input_ids"]

    def script(request: Any) -> list[Any]:
        if request.stopping.max_new_tokens == 3:
            return [GenerationError("shard 0 failed")]
        return token_events(ids)

    engine = ScriptedEngine(script)
    metrics = Metrics()
    app = create_app(router_config(), tokenizer, engine, MODEL_INFO, metrics=metrics)
    prompt = "Once upon a time"

    async def main() -> tuple[str, str]:
        async with TestClient(TestServer(app)) as client:
            await client.post("/generate", json={"inputs": prompt})
            await (await client.post("/generate_stream", json={"inputs": prompt})).text()
            await client.post("/generate", json={"inputs": ""})
            await client.post("/generate", json={"inputs": prompt,
                                                 "parameters": {"max_new_tokens": 3}})
            response = await client.get("/metrics")
            return response.headers["Content-Type"], await response.text()

    content_type, text = asyncio.run(main())
    assert content_type.startswith("text/plain")
    values = samples(text)
    outcomes = {labels[0][1]: value for (name, labels), value in values.items()
                if name == "shardgen_requests_total"}
    assert outcomes == {"success": 2, "validation": 1, "generation": 1}
    prompt_len = len(tokenizer.hf(prompt)["input_ids"])
    assert values[("shardgen_prompt_tokens_total", ())] == 3 * prompt_len
    assert values[("shardgen_generated_tokens_total", ())] == 2 * len(ids)
    assert values[("shardgen_time_to_first_token_seconds_count", ())] == 2
    assert values[("shardgen_request_validation_duration_seconds_count", ())] == 3  # not the empty one
    assert values[("shardgen_inter_token_latency_seconds_count", ())] == 2 * (len(ids) - 1)
    assert values[("shardgen_request_duration_seconds_count", ())] == 2
    assert values[("shardgen_request_generated_tokens_sum", ())] == 2 * len(ids)


def test_timer_measures_from_arrival() -> None:
    metrics = Metrics()
    now = iter([10.0, 10.125, 10.5, 10.75, 11.0, 12.0])
    timer = RequestTimer(metrics, clock=lambda: next(now))  # arrival at 10.0
    timer.admitted(7)  # 10.125: validated and tokenized
    timer.token()      # 10.5: first token
    timer.token()      # 10.75
    timer.token()      # 11.0
    timer.finished(3)  # 12.0
    values = samples(metrics.render().decode())
    assert values[("shardgen_request_validation_duration_seconds_sum", ())] == pytest.approx(0.125)
    assert values[("shardgen_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert values[("shardgen_inter_token_latency_seconds_sum", ())] == pytest.approx(0.5)
    assert values[("shardgen_inter_token_latency_seconds_count", ())] == 2
    assert values[("shardgen_request_duration_seconds_sum", ())] == pytest.approx(2.0)
    assert values[("shardgen_request_input_tokens_sum", ())] == 7
    RequestTimer(None).token()  # without metrics: nothing to do, nothing fails
