"""Graceful shutdown through the real launcher: SIGTERM while requests stream.

The router stops admitting at once (503, /ready 503, /health still 200), lets the
requests in flight finish within --graceful-termination-timeout, fails those that cannot
when it runs out, then the shards stop: the launcher exits 0, and no process and no
socket file is left. The prompts begin with the slow marker (every step 50 ms), so that the
requests are still running when the probes and the grace period's end come.
"""

from __future__ import annotations

import asyncio
import glob
import re
import signal
import time

import psutil
import pytest
import requests

from harness import STORIES, Server
from reliability import SLOW_MARKER, StreamResult, generate, greedy_ids, session, slow_env, stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SHORT = [f"{SLOW_MARKER} {text}" for text in
         ("Once upon a time", "The little dog", "One day, a big bird")]


def wait_for_503(server: Server, timeout_s: float = 10.0) -> requests.Response:
    """POST small requests until the router refuses one (it may still admit the first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = generate(server, "Hi", timeout_s=10, max_new_tokens=2)
        if response.status_code == 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def start(tmp_path, grace_s: float) -> tuple[Server, list[psutil.Process], str]:
    """A server, its child processes, and its shards' socket prefix."""
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    server = Server("--model-id", str(STORIES), "--graceful-termination-timeout", str(grace_s),
                    log_path=tmp_path / "launcher.log", env=slow_env())
    children = psutil.Process(server.process.pid).children(recursive=True)
    prefix = re.search(r"sockets (\S+)-\{rank\}", server.logs()).group(1)
    return server, children, prefix


async def terminate_while_streaming(server: Server, streams: list[dict]
                                    ) -> tuple[list[StreamResult], float, dict]:
    """Start the streams, SIGTERM the launcher once each has its first token, and probe
    the routes during the drain. Returns (results, time of SIGTERM, probe answers)."""
    async with session() as http:
        started = [asyncio.Event() for _ in streams]
        running = [asyncio.ensure_future(stream(http, server, on_event=event, **kwargs))
                   for kwargs, event in zip(streams, started)]
        await asyncio.gather(*(event.wait() for event in started))
        server.process.send_signal(signal.SIGTERM)
        terminated_at = time.monotonic()
        loop = asyncio.get_running_loop()
        probes = {
            "generate": await loop.run_in_executor(None, wait_for_503, server),
            "ready": await loop.run_in_executor(
                None, lambda: requests.get(f"{server.url}/ready", timeout=10)),
            "health": await loop.run_in_executor(
                None, lambda: requests.get(f"{server.url}/health", timeout=10)),
        }
        return list(await asyncio.gather(*running)), terminated_at, probes


def assert_stopped_cleanly(server: Server, children: list[psutil.Process], prefix: str) -> None:
    assert server.process.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.pid for p in alive]
    assert glob.glob(f"{prefix}-*") == []


def test_sigterm_lets_in_flight_requests_finish_then_stops_everything(tmp_path) -> None:
    server, children, prefix = start(tmp_path, grace_s=60)
    try:
        expected = {prompt: greedy_ids(server, prompt, 40) for prompt in SHORT}
        results, _, probes = asyncio.run(terminate_while_streaming(
            server, [{"inputs": prompt, "max_new_tokens": 40} for prompt in SHORT]))
        # New requests were refused while the others drained; liveness stayed up.
        assert probes["generate"].status_code == 503, probes["generate"].text
        assert probes["generate"].json()["error_type"] == "unavailable"
        assert probes["ready"].status_code == 503
        assert probes["health"].status_code == 200
        # The requests in flight finished with their tokens.
        for prompt, result in zip(SHORT, results):
            assert result.finished and result.ids == expected[prompt]
        assert_stopped_cleanly(server, children, prefix)
        assert "shutting down: draining for up to 60 s" in server.logs()
    finally:
        server.stop()


def test_what_outlasts_the_grace_period_fails_at_its_end(tmp_path) -> None:
    grace_s = 1.0  # 480 steps of 50 ms take far longer
    server, children, prefix = start(tmp_path, grace_s)
    try:
        (result,), terminated_at, probes = asyncio.run(terminate_while_streaming(
            server, [{"inputs": SHORT[0], "max_new_tokens": 480, "ignore_eos": True}]))
        assert probes["generate"].status_code == 503
        assert not result.finished and result.error is not None, result.events[-1:]
        assert "stopped before the request finished" in result.error["error"]
        assert 0 < len(result.ids) < 480
        assert grace_s - 0.5 <= result.ended - terminated_at < grace_s + 10
        assert_stopped_cleanly(server, children, prefix)
        assert "1 request(s) still in the engine after draining" in server.logs()
    finally:
        server.stop()
