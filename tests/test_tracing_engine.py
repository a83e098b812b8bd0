"""The engine's spans against a real shard in this process (stories260K on CPU).

Requests carry the context of a "client" span, as the HTTP layer hands it over. The test
checks each request's queue and inference spans, the prefill/decode/filter step spans
(parent: the first rider's inference span; links: every rider's), and that the shard's
span of each RPC is the child of the step that sent it, with the runner's kv_write,
forward and sampling spans under it.
It also checks the queue-time histogram that the engine records.
"""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from shard_rpc import STORIES, running_shard
from shardgen.router import engine_spans
from shardgen.router.block_manager import BlockManager
from shardgen.router.client import connect_and_warm_up
from shardgen.router.engine import Engine, RequestHandle, SchedulerConfig
from shardgen.router.metrics import Metrics
from shardgen.common import tracing
from shardgen.router.requests import GenerationRequest, SamplingParams, StoppingParams
from shardgen.shard import rpc_tracing
from test_engine_loop import serving
from tracing_capture import capture_spans, is_child, named

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} is missing")]

SERVICE = "shardgen.v1.TextGenerationService"
PROMPTS = {"A": [1, 403, 407, 261, 378], "B": [1, 274, 287, 269, 317, 263, 377],
           "C": [1, 385, 328, 432, 261, 376]}


def _request(prompt: list[int], max_new_tokens: int, parent: trace.Span) -> GenerationRequest:
    return GenerationRequest(
        input_ids=prompt, sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new_tokens, ignore_eos_token=True),
        trace_context=trace.set_span_in_context(parent, otel_context.Context()))


async def _drain(handle: RequestHandle, cancel_after: int | None = None) -> int:
    count = 0
    async for _ in handle:
        count += 1
        if count == cancel_after:
            handle.cancel()
    return count


async def _serve_three(uds_path: str, metrics: Metrics) -> dict[str, trace.Span]:
    """A and B run 6 tokens; C is cancelled after its second, which filters the batch."""
    client, _, num_blocks, block_size = await connect_and_warm_up(
        uds_path, 1, max_batch_prefill_tokens=64, max_batch_size=8, max_total_tokens=64,
        timeout_s=30)
    engine = Engine(client, SchedulerConfig(), BlockManager(num_blocks, block_size),
                    metrics=metrics)
    tracer = trace.get_tracer("test-client")
    parents = {name: tracer.start_span(f"client {name}") for name in PROMPTS}
    await engine.start()
    try:
        handles = {name: engine.submit(_request(PROMPTS[name], 6, parents[name]))
                   for name in PROMPTS}
        counts = await asyncio.gather(_drain(handles["A"]), _drain(handles["B"]),
                                      _drain(handles["C"], cancel_after=2))
        assert counts == [6, 6, 2]
    finally:
        await engine.stop(drain_timeout_s=1.0)
        await client.close()
    for span in parents.values():
        span.end()
    return parents


def _children(spans: list[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [span for span in named(spans, name) if is_child(span, parent)]


def _linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def test_request_step_and_shard_spans_form_one_tree_per_request() -> None:
    exporter = capture_spans()
    metrics = Metrics()
    with running_shard() as shard:
        parents = asyncio.run(_serve_three(shard.config.uds_path, metrics))
    spans = list(exporter.get_finished_spans())
    ended = {span.context.span_id: span for span in spans}
    by_name = {name: ended[parent.get_span_context().span_id] for name, parent in parents.items()}

    inference = {}
    for name, parent in by_name.items():
        (queue,) = _children(spans, parent, "queue")
        (inference[name],) = _children(spans, parent, "inference")
        assert queue.end_time <= inference[name].start_time
    ends = {name: (span.attributes or {})[engine_spans.END] for name, span in inference.items()}
    assert ends == {"A": "finished", "B": "finished", "C": "cancelled"}
    ids = {name: span.context.span_id for name, span in inference.items()}

    # One prefill for the three prompts, under A (the first rider), linked to all three.
    (prefill,) = named(spans, "prefill")
    assert is_child(prefill, inference["A"])
    assert _linked(prefill) == set(ids.values())
    attributes = prefill.attributes or {}
    assert attributes[engine_spans.BATCH_SIZE] == 3
    assert attributes[engine_spans.PREFILL_TOKENS] == sum(map(len, PROMPTS.values()))
    assert attributes[engine_spans.FORWARD_NS] > 0

    decodes = named(spans, "decode")
    assert len(decodes) == 5  # tokens 2..6 of A and B
    assert all(is_child(span, inference["A"]) for span in decodes)
    assert {frozenset(_linked(span)) for span in decodes} <= {
        frozenset(ids.values()), frozenset((ids["A"], ids["B"]))}
    (filtered,) = named(spans, "filter")
    assert _linked(filtered) == {ids["A"], ids["B"]}

    # Each step's RPC span on the shard is the step's child, and says what it computed.
    for step, method in [(prefill, "Prefill"), (filtered, "FilterBatch")] + [
            (span, "Decode") for span in decodes]:
        (rpc,) = _children(spans, step, f"{SERVICE}/{method}")
        assert rpc.kind == SpanKind.SERVER
        assert (rpc.attributes or {})[rpc_tracing.RANK] == 0
    (prefill_rpc,) = _children(spans, prefill, f"{SERVICE}/Prefill")
    prompt_tokens = sum(map(len, PROMPTS.values()))
    assert (prefill_rpc.attributes or {})[rpc_tracing.TOKENS] == prompt_tokens
    assert (prefill_rpc.attributes or {})[rpc_tracing.BATCH_SIZE] == 3
    # The runner's spans, on the step thread, under the RPC's span.
    (kv_write,) = _children(spans, prefill_rpc, "kv_write")
    (forward,) = _children(spans, prefill_rpc, "forward")
    (sampling,) = _children(spans, prefill_rpc, "sampling")
    assert kv_write.end_time <= forward.start_time and forward.end_time <= sampling.start_time
    assert (kv_write.attributes or {})["shardgen.kv.slots"] == prompt_tokens
    assert (forward.attributes or {})["shardgen.tokens"] == prompt_tokens
    assert (sampling.attributes or {})["shardgen.batch.size"] == 3
    (decode_rpc, *_) = _children(spans, decodes[0], f"{SERVICE}/Decode")
    (forward,) = _children(spans, decode_rpc, "forward")
    assert (forward.attributes or {})["shardgen.tokens"] in (2, 3)  # C leaves after 2 tokens

    text = metrics.render().decode()
    queued = {s.name: s.value for family in text_string_to_metric_families(text)
              for s in family.samples}
    assert queued["shardgen_request_queue_duration_seconds_count"] == 3


def test_with_tracing_off_the_engine_records_nothing(tmp_path, monkeypatch) -> None:
    exporter = capture_spans()
    monkeypatch.setattr(tracing, "_provider", None)  # as in a process without an endpoint
    parent = trace.get_tracer("test-client").start_span("client")

    async def main() -> int:
        async with serving(tmp_path) as served:
            handle = served.engine.submit(_request([3, 4, 5, 6], 4, parent))
            return await _drain(handle)

    assert asyncio.run(main()) == 4
    parent.end()
    assert [span.name for span in exporter.get_finished_spans()] == ["client"]
