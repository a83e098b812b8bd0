"""JSON logs (--json-output): one object per line, with rank, and the trace and span ids of
the span a line was logged in, also from the shard's step thread and the router's
per-request line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from types import SimpleNamespace
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace

from shardgen.common.logging import setup_logging
from shardgen.router.metrics import Metrics
from shardgen.router.request_metrics import RequestTimer
from shardgen.shard.server import ShardServicer
from tracing_capture import capture_spans


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """setup_logging(json_output=True) for one test; a function that reads its lines."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("shard", rank=3, json_output=True)
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)  # what went to stderr comes here

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    try:
        yield lines
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _ids(span: trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def test_lines_in_a_span_carry_its_ids(json_logs: Any) -> None:
    capture_spans()
    log = logging.getLogger("shardgen.test")
    log.info("outside")
    with trace.get_tracer("test").start_as_current_span("work") as span:
        log.warning("inside %d", 1)
    outside, inside = json_logs()
    assert outside["message"] == "outside" and "trace_id" not in outside
    assert (inside["trace_id"], inside["span_id"]) == _ids(span)
    assert inside["message"] == "inside 1" and inside["level"] == "WARNING"
    assert (inside["process"], inside["rank"]) == ("shard", 3)


def test_the_shard_step_thread_logs_in_the_rpcs_span(json_logs: Any) -> None:
    capture_spans()
    servicer = ShardServicer(runner=SimpleNamespace(bind_thread=lambda: None), config=None)  # type: ignore[arg-type]
    log = logging.getLogger("shardgen.shard.runner")

    async def call() -> trace.Span:
        with trace.get_tracer("test").start_as_current_span("Decode") as span:
            await servicer._serial(log.info, "a step")
        return span

    try:
        span = asyncio.run(call())
    finally:
        servicer.close()
    (line,) = json_logs()
    assert line["message"] == "a step"
    assert (line["trace_id"], line["span_id"]) == _ids(span)


def test_a_finished_request_logs_one_line_in_its_span(json_logs: Any) -> None:
    capture_spans()
    now = iter([1.0, 1.125, 1.25, 1.5, 2.0])
    with trace.get_tracer("test").start_as_current_span("POST /generate") as span:
        timer = RequestTimer(Metrics(), clock=lambda: next(now))
        timer.admitted(7)
        timer.token()
        timer.token()
        timer.finished(2)
    (line,) = json_logs()
    assert line["trace_id"] == _ids(span)[0]
    assert line["message"] == ("request done in 1.000 s: 7 prompt tokens, 2 generated, "
                               "validated after 0.125 s, first token after 0.250 s")


def test_the_step_thread_binds_the_ranks_device_before_any_call() -> None:
    """CUDA's current device is per thread and Triton launches on it: rank 1's steps failed
    on cuda:0 ("cannot be accessed from Triton") until the step thread bound cuda:1."""
    bound: list[threading.Thread] = []
    servicer = ShardServicer(runner=SimpleNamespace(bind_thread=lambda: bound.append(threading.current_thread())),
                             config=None)  # type: ignore[arg-type]
    try:
        first, second = asyncio.run(_two_calls(servicer))
    finally:
        servicer.close()
    assert bound == [first] and second is first and first is not threading.current_thread()


async def _two_calls(servicer: ShardServicer) -> tuple[threading.Thread, threading.Thread]:
    return (await servicer._serial(threading.current_thread),
            await servicer._serial(threading.current_thread))
