"""Faults through the real stack: disconnects, deadlines, a shard step that raises or runs
out of memory (test-only fault injection, shard/faults.py), and a shard killed outright.

One server serves the module with fault injection on: prompts made of a marker text make
their Prefill raise (`error`) or run out of memory (`oom`), or every step that carries
them take 50 ms (`slow`), so that a request outlives its deadline, or a client, however
fast the machine running the tests is. --max-batch-size 2 keeps the
batch of a failing step small and known; --max-batch-prefill-tokens 64 makes the budget
cut after an out-of-memory step visible as extra prefill chunks (prefix caching is off, so
that a prompt sent twice is computed twice).
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from harness import STORIES, Server
from reliability import (SLOW_MARKER, generate, greedy_ids, marker_ids, sample, scrape,
                         session, slow_env, stream, wait_idle)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ERROR_MARKER = "Zebra quartz fault"
OOM_MARKER = "Zebra quartz memory"
PROMPT = "Once upon a time"
OTHER = "The little dog"


def injection_spec() -> str:
    return ";".join(f"{kind}={','.join(map(str, marker_ids(marker)))}" for kind, marker in
                    (("error", ERROR_MARKER), ("oom", OOM_MARKER), ("slow", SLOW_MARKER)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    served = Server("--model-id", str(STORIES), "--max-batch-size", "2",
                    "--max-batch-prefill-tokens", "64", "--disable-prefix-caching",
                    log_path=tmp_path_factory.mktemp("faults") / "launcher.log",
                    env={"SHARDGEN_FAULT_INJECTION": injection_spec()})
    yield served
    served.stop()


def wait_for_log(server: Server, text: str, timeout_s: float = 15.0) -> bool:
    """Whether text shows in the launcher's log within timeout_s (lines reach it through
    the launcher's forwarding thread, after the HTTP answer may have)."""
    deadline = time.monotonic() + timeout_s
    while text not in server.logs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def decode_steps(server: Server) -> float:
    return sample(scrape(server), "shardgen_batch_size_count", method="decode")


def prefill_steps(server: Server) -> float:
    return sample(scrape(server), "shardgen_batch_size_count", method="prefill")


# ---------------------------------------------------------------- disconnects


def test_a_client_that_goes_away_leaves_the_batch_and_frees_its_blocks(server: Server) -> None:
    expected = greedy_ids(server, OTHER, 40)
    wait_idle(server)
    before, steps_before = scrape(server), decode_steps(server)

    async def clients() -> tuple:
        async with session() as client:
            started = asyncio.Event()
            leaver = asyncio.ensure_future(stream(
                client, server, SLOW_MARKER, max_new_tokens=400, ignore_eos=True,
                disconnect_after=5, on_event=started))
            await started.wait()
            stayer = await stream(client, server, OTHER, max_new_tokens=40)
            return await leaver, stayer

    leaver, stayer = asyncio.run(clients())
    assert leaver.disconnected and len(leaver.ids) == 5
    assert stayer.finished and stayer.ids == expected
    idle = wait_idle(server)
    # Had the leaver stayed in the batch, it would have taken ~400 decode steps.
    assert decode_steps(server) - steps_before < 120
    assert sample(idle, "shardgen_requests_total", outcome="cancelled") - sample(
        before, "shardgen_requests_total", outcome="cancelled") == 1


# ---------------------------------------------------------------- deadlines


def test_a_request_past_its_timeout_gets_504_and_frees_everything(server: Server) -> None:
    expected = greedy_ids(server, PROMPT, 8)
    started = time.monotonic()
    response = generate(server, SLOW_MARKER, headers={"x-request-timeout": "1.5"},
                        max_new_tokens=400, ignore_eos=True)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error_type"] == "timeout"
    assert "deadline" in response.json()["error"]
    assert 1.5 <= elapsed < 10
    wait_idle(server)
    assert greedy_ids(server, PROMPT, 8) == expected


def test_a_stream_past_its_timeout_ends_with_a_timeout_event(server: Server) -> None:
    async def client():
        async with session() as http:
            return await stream(http, server, SLOW_MARKER,
                                headers={"x-request-timeout": "1.5"},
                                max_new_tokens=400, ignore_eos=True)

    result = asyncio.run(client())
    assert result.status == 200 and not result.finished
    assert result.error is not None and result.error["error_type"] == "timeout"
    assert 0 < len(result.ids) < 400
    assert result.ended - result.sent < 10
    wait_idle(server)


def test_a_malformed_timeout_header_is_422(server: Server) -> None:
    response = generate(server, PROMPT, headers={"x-request-timeout": "soon"}, max_new_tokens=2)
    assert response.status_code == 422
    assert "x-request-timeout" in response.json()["error"]


# ---------------------------------------------------------------- a step that fails


def test_a_step_that_raises_fails_only_the_request_at_fault(server: Server) -> None:
    expected_running = greedy_ids(server, OTHER, 60)
    expected_queued = greedy_ids(server, PROMPT, 20)
    before = wait_idle(server)

    async def clients() -> tuple:
        async with session() as http:
            running_started = asyncio.Event()
            running = asyncio.ensure_future(stream(http, server, OTHER, max_new_tokens=60,
                                                   on_event=running_started))
            await running_started.wait()
            # The faulty request joins the running one (the batch holds 2); the third waits.
            faulty = asyncio.ensure_future(stream(http, server, ERROR_MARKER, max_new_tokens=5))
            await asyncio.sleep(0.05)
            queued = asyncio.ensure_future(stream(http, server, PROMPT, max_new_tokens=20))
            return await running, await faulty, await queued

    running, faulty, queued = asyncio.run(clients())
    assert faulty.status == 424
    assert faulty.body["error_type"] == "generation"
    assert "shard 0 failed Prefill: INTERNAL: InjectedFault" in faulty.body["error"]
    # The request that shared the failed step was recomputed and went on to its tokens,
    # as did the one that was not in it.
    assert running.finished and running.ids == expected_running
    assert queued.finished and queued.ids == expected_queued
    after = wait_idle(server)
    assert wait_for_log(server, "requeuing 1 to isolate the fault")
    # Two failed steps: the shared one (both requests requeued), then the faulty one's trial
    # (the running request requeued once more).
    assert sample(after, "shardgen_step_failures_total", code="INTERNAL") - sample(
        before, "shardgen_step_failures_total", code="INTERNAL") == 2
    assert sample(after, "shardgen_fault_requeues_total") - sample(
        before, "shardgen_fault_requeues_total") == 3


def test_out_of_memory_fails_the_step_and_shrinks_the_next_prefills(server: Server) -> None:
    long_prompt = " ".join(["Lily saw a big red ball in the park."] * 4)  # 57 tokens
    expected = greedy_ids(server, long_prompt, 8)
    chunks_before = prefill_steps(server)
    greedy_ids(server, long_prompt, 8)
    whole_budget_prefills = prefill_steps(server) - chunks_before

    response = generate(server, OOM_MARKER, max_new_tokens=5)
    assert response.status_code == 424, response.text
    assert "RESOURCE_EXHAUSTED" in response.json()["error"]
    assert "out of memory" in response.json()["error"]
    assert wait_for_log(server, "prefill budget cut from 64 to 32 tokens")

    chunks_before = prefill_steps(server)
    assert greedy_ids(server, long_prompt, 8) == expected
    assert prefill_steps(server) - chunks_before > whole_budget_prefills
    wait_idle(server)


# ---------------------------------------------------------------- a shard killed outright


def test_a_killed_shard_fails_in_flight_requests_at_once(tmp_path) -> None:
    server = Server("--model-id", str(STORIES), log_path=tmp_path / "launcher.log",
                    env=slow_env())
    children = psutil.Process(server.process.pid).children(recursive=True)
    shard = next(p for p in children if "shardgen.shard" in " ".join(p.cmdline()))
    prefix = re.search(r"sockets (\S+)-\{rank\}", server.logs()).group(1)
    killed_at = 0.0

    async def clients() -> list:
        nonlocal killed_at
        async with session() as http:
            first = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.ensure_future(stream(http, server, SLOW_MARKER, max_new_tokens=400,
                                                    ignore_eos=True, on_event=event))
                       for event in first]
            await asyncio.gather(*(event.wait() for event in first))
            os.kill(shard.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            return await asyncio.gather(*streams)

    try:
        results = asyncio.run(clients())
        for result in results:
            # Each stream ends soon after the kill: an error event, or the connection drops
            # when the launcher takes the router down.
            assert not result.finished
            assert result.ended - killed_at < 10  # about 0.2 s when the machine is idle
            assert result.dropped or (result.error is not None
                                      and result.error["error_type"] == "generation")
        errors = [r.error["error"] for r in results if r.error is not None]
        assert all("shard 0" in error for error in errors), errors
        server.process.wait(timeout=60)
        assert server.process.returncode not in (None, 0)
        logs = server.logs()
        assert "shard 0 exited unexpectedly (killed by SIGKILL)" in logs
        assert "its last lines:" in logs
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive
        assert glob.glob(f"{prefix}-*") == []
    finally:
        server.stop()
