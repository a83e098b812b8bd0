"""Observability end to end: traces into a real OTLP receiver, /metrics, JSON logs.

One server for the module: the real launcher, stories260K on two CPU shards (gloo),
`--otlp-endpoint` pointing at an OTLP/gRPC receiver process (otlp_receiver.py) that writes
every span it gets to a JSON-lines file, and `--json-output`. Each process exports its
spans in batches; OTEL_BSP_SCHEDULE_DELAY=100 (ms) lets the tests read them while the
server runs. The span names and attributes checked are the ones docs/observability.md
documents.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import STORIES, Server
from otlp_receiver import OtlpReceiver, Span

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SERVICE = "shardgen-observed"
RPC = "shardgen.v1.TextGenerationService/"
BLOCK_SIZE = 16  # the shard's default


@dataclass
class Stack:
    server: Server
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    folder = tmp_path_factory.mktemp("observability")
    receiver = OtlpReceiver(folder / "spans.jsonl")
    try:
        server = Server("--model-id", str(STORIES), "--num-shard", "2",
                        "--kv-cache-bytes", str(64 * 2**20),
                        "--otlp-endpoint", receiver.endpoint, "--otlp-service-name", SERVICE,
                        "--json-output", log_path=folder / "launcher.log",
                        # One thread per shard: two ranks must not starve each other.
                        env={"OMP_NUM_THREADS": "1", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    except BaseException:
        receiver.stop()
        raise
    yield Stack(server, receiver)
    server.stop()
    receiver.stop()


def generate(server: Server, inputs: str, headers: dict[str, str] | None = None,
             **parameters: Any) -> dict[str, Any]:
    """A /generate with details and the prompt's tokens (decoder_input_details)."""
    response = requests.post(
        f"{server.url}/generate", headers=headers, timeout=120,
        json={"inputs": inputs, "parameters": {"details": True, "decoder_input_details": True,
                                               **parameters}})
    assert response.status_code == 200, response.text
    return response.json()


def traceparent() -> tuple[str, str, dict[str, str]]:
    """A fresh client span: (trace id, span id, the header carrying them)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01"}


# ---------------------------------------------------------------- traces


def _named(spans: list[Span], name: str) -> list[Span]:
    return [span for span in spans if span["name"] == name]


def _one(spans: list[Span], name: str) -> Span:
    found = _named(spans, name)
    assert len(found) == 1, f"{len(found)} spans named {name!r}"
    return found[0]


def _children(spans: list[Span], parent: Span, name: str) -> list[Span]:
    return [span for span in _named(spans, name) if span["parent_span_id"] == parent["span_id"]]


def _rank(span: Span) -> int | None:
    return span["resource"].get("shardgen.rank")


def _complete(trace_id: str, decode_steps: int) -> Any:
    """Whether a request's trace has arrived whole: its request span, and on each rank one
    Prefill and `decode_steps` Decode RPCs with the runner's three spans under each."""
    def done(spans: list[Span]) -> bool:
        mine = [span for span in spans if span["trace_id"] == trace_id]
        names = [span["name"] for span in mine]
        rpcs = 2 * (1 + decode_steps)
        return ("POST /generate" in names and names.count(f"{RPC}Prefill") == 2
                and names.count(f"{RPC}Decode") == rpcs - 2 and names.count("forward") == rpcs
                and names.count("sampling") == rpcs and names.count("kv_write") == rpcs)
    return done


def test_one_trace_holds_the_client_the_router_and_both_shards(stack: Stack) -> None:
    plain = generate(stack.server, "The little dog", max_new_tokens=3)
    trace_id, client_span, header = traceparent()
    answer = generate(stack.server, "Once upon a time", header, max_new_tokens=5)
    generated = answer["details"]["generated_tokens"]
    prompt_tokens = len(answer["details"]["prefill"])
    spans = stack.receiver.wait_for(_complete(trace_id, generated - 1))
    trace = [span for span in spans if span["trace_id"] == trace_id]
    by_id = {span["span_id"]: span for span in trace}
    # Every span of the trace hangs from the client's span, through spans of the trace.
    for span in trace:
        assert span["parent_span_id"] == client_span or span["parent_span_id"] in by_id, span
        assert span["resource"]["service.name"] == SERVICE

    request = _one(trace, "POST /generate")
    assert request["parent_span_id"] == client_span and request["kind"] == "SPAN_KIND_SERVER"
    assert {key: request["attributes"].get(key) for key in (
        "http.route", "http.response.status_code", "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens", "gen_ai.request.max_tokens", "shardgen.finish_reason",
        "shardgen.outcome")} == {
        "http.route": "/generate", "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.usage.output_tokens": generated,
        "gen_ai.request.max_tokens": 5,
        "shardgen.finish_reason": answer["details"]["finish_reason"],
        "shardgen.outcome": "success"}
    (validate,) = _children(trace, request, "validate")
    assert len(_children(trace, validate, "tokenize")) == 1
    (queue,) = _children(trace, request, "queue")
    (inference,) = _children(trace, request, "inference")
    assert queue["end_time_unix_nano"] <= inference["start_time_unix_nano"]
    assert inference["attributes"]["shardgen.request.end"] == "finished"

    # The batch steps: children of the request's inference span, linked to it.
    (prefill,) = _children(trace, inference, "prefill")
    decodes = _children(trace, inference, "decode")
    assert len(decodes) == generated - 1
    for step in [prefill, *decodes]:
        assert inference["span_id"] in [link["span_id"] for link in step["links"]]
        assert step["attributes"]["shardgen.batch.size"] == 1
        assert step["attributes"]["shardgen.shard.forward_ns"] > 0
    assert prefill["attributes"]["shardgen.batch.prefill_tokens"] == prompt_tokens

    # Both shards: one RPC span per step, child of the step, with the runner's spans.
    for rank in (0, 1):
        (prefill_rpc,) = [span for span in _children(trace, prefill, f"{RPC}Prefill")
                          if _rank(span) == rank]
        assert prefill_rpc["kind"] == "SPAN_KIND_SERVER"
        assert prefill_rpc["attributes"]["shardgen.rank"] == rank
        assert prefill_rpc["attributes"]["shardgen.batch.tokens"] == prompt_tokens
        assert prefill_rpc["attributes"]["shardgen.batch.size"] == 1
        for step in decodes:
            (decode_rpc,) = [span for span in _children(trace, step, f"{RPC}Decode")
                             if _rank(span) == rank]
            assert decode_rpc["attributes"]["shardgen.batch.tokens"] == 1
        (forward,) = _children(trace, prefill_rpc, "forward")
        assert forward["attributes"]["shardgen.tokens"] == prompt_tokens
        assert _rank(forward) == rank
        assert len(_children(trace, prefill_rpc, "sampling")) == 1
        (kv_write,) = _children(trace, prefill_rpc, "kv_write")
        assert kv_write["attributes"]["shardgen.kv.slots"] == prompt_tokens

    # The request without a traceparent started a trace of its own, shards included.
    plain_requests = [span for span in _named(spans, "POST /generate")
                      if span["parent_span_id"] == ""]
    assert len(plain_requests) >= 1
    own = plain_requests[0]["trace_id"]
    assert own != trace_id
    assert plain["details"]["generated_tokens"] >= 1
    assert {_rank(span) for span in spans
            if span["trace_id"] == own and span["name"] == f"{RPC}Prefill"} == {0, 1}


# ---------------------------------------------------------------- metrics


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_metrics_parse_and_move_as_requests_are_served(stack: Stack) -> None:
    server = stack.server
    before = scrape(server)
    prompt = ("Tom and his dog Max went to the big park near the river to play with a red "
              "ball and a kite, and they ran until the sun went down.")
    # The repeat asks no prompt logprobs: those would compute the whole prompt again.
    answers = [generate(server, prompt, max_new_tokens=6),
               generate(server, prompt, max_new_tokens=6, decoder_input_details=False),
               generate(server, "A cat sat", max_new_tokens=4)]
    bad = requests.post(f"{server.url}/generate", json={"inputs": ""}, timeout=30)
    assert bad.status_code == 422
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{key} missing from /metrics"
        return after[key] - before.get(key, 0.0)

    generated = [answer["details"]["generated_tokens"] for answer in answers]
    prompts = [len(answers[0]["details"]["prefill"])] * 2 + [len(answers[2]["details"]["prefill"])]
    assert delta("shardgen_requests_total", outcome="success") == 3
    assert delta("shardgen_requests_total", outcome="validation") == 1
    for histogram in ("shardgen_request_duration_seconds",
                      "shardgen_request_queue_duration_seconds",
                      "shardgen_time_to_first_token_seconds", "shardgen_request_input_tokens",
                      "shardgen_request_generated_tokens"):
        assert delta(f"{histogram}_count") == 3, histogram
    assert delta("shardgen_request_queue_duration_seconds_sum") > 0
    assert delta("shardgen_inter_token_latency_seconds_count") == sum(generated) - 3
    assert delta("shardgen_request_input_tokens_sum") == sum(prompts)
    assert delta("shardgen_prompt_tokens_total") == sum(prompts)
    assert delta("shardgen_request_generated_tokens_sum") == sum(generated)
    assert delta("shardgen_generated_tokens_total") == sum(generated)
    # One prefill per request (they came one at a time), a decode per further token.
    assert delta("shardgen_batch_size_count", method="prefill") == 3
    assert delta("shardgen_batch_size_count", method="decode") == sum(generated) - 3
    assert delta("shardgen_batch_forward_duration_seconds_count", method="prefill") == 3
    assert delta("shardgen_batch_forward_duration_seconds_sum", method="decode") > 0
    # The repeated prompt found its whole blocks in the prefix cache.
    hits = delta("shardgen_prefix_cache_hit_tokens_total")
    assert hits > 0 and hits % BLOCK_SIZE == 0 and hits < prompts[0]
    # Idle now: nothing queued or held, the finished requests' blocks kept for reuse.
    assert after[("shardgen_kv_blocks_total", ())] > 0
    assert after[("shardgen_kv_blocks_used", ())] == 0
    assert after[("shardgen_kv_blocks_cached", ())] > 0
    assert after[("shardgen_queue_size", ())] == 0


# ---------------------------------------------------------------- logs


def _log_lines(server: Server) -> list[dict[str, Any]]:
    lines = [line for line in server.logs().splitlines() if line.strip()]
    not_json = []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            not_json.append(line)
    assert not not_json, f"log lines that are not JSON: {not_json[:5]}"
    return entries


def test_every_process_logs_json_with_rank_and_trace_id(stack: Stack) -> None:
    trace_id, _, header = traceparent()
    generate(stack.server, "One day, a little bird", header, max_new_tokens=3)
    deadline = time.monotonic() + 10
    while True:  # the launcher forwards the router's lines as they come
        entries = _log_lines(stack.server)
        done = [entry for entry in entries
                if entry.get("trace_id") == trace_id and entry["process"] == "router"]
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {entry["process"] for entry in entries} == {"launcher", "router", "shard"}
    assert {entry.get("rank") for entry in entries if entry["process"] == "shard"} == {0, 1}
    (line,) = done
    assert line["message"].startswith("request done in")
    assert len(line["span_id"]) == 16
