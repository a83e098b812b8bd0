"""Hundreds of concurrent streaming clients against one CPU server (stories260K).

Every accepted request streams exactly the tokens its prompt gets when it runs alone;
the requests past --max-concurrent-requests get 429 at once, while the accepted ones are
still running; the engine never holds more than that many (queued + running); and once
the clients are done, blocks, queue and batch are back at zero.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from harness import STORIES, Server
from reliability import (StreamResult, generate, greedy_ids, sample, scrape, session, stream,
                         wait_idle)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

MAX_CONCURRENT = 160
CLIENTS = 240
MAX_NEW_TOKENS = 16
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park. They",
           "One day, a big bird", "Tom had a red ball", "The sun was hot and"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    served = Server("--model-id", str(STORIES),
                    "--max-concurrent-requests", str(MAX_CONCURRENT),
                    log_path=tmp_path_factory.mktemp("load") / "launcher.log")
    yield served
    served.stop()


class EngineWatch:
    """Scrapes the engine's gauges every 0.2 s on a thread; keeps the largest seen."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak_queue = self.peak_engine = 0.0
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            values = scrape(self.server)
            queued = sample(values, "shardgen_queue_size")
            running = sample(values, "shardgen_batch_current_size")
            self.peak_queue = max(self.peak_queue, queued)
            self.peak_engine = max(self.peak_engine, queued + running)
            self.scrapes += 1

    def __enter__(self) -> EngineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def storm(server: Server) -> list[tuple[str, StreamResult]]:
    """CLIENTS streams at once, cycling over PROMPTS."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CLIENTS)]
    async with session() as client:
        results = await asyncio.gather(*(
            stream(client, server, prompt, max_new_tokens=MAX_NEW_TOKENS) for prompt in prompts))
    return list(zip(prompts, results))


def test_hundreds_of_streams_get_their_tokens_or_429_at_once(server: Server) -> None:
    expected = {prompt: greedy_ids(server, prompt, MAX_NEW_TOKENS) for prompt in PROMPTS}
    before = scrape(server)
    with EngineWatch(server) as watch:
        results = asyncio.run(storm(server))
    accepted = [(prompt, r) for prompt, r in results if r.status == 200]
    rejected = [r for _, r in results if r.status != 200]

    # Every accepted stream has exactly the tokens of its prompt run alone.
    assert len(accepted) >= MAX_CONCURRENT
    for prompt, result in accepted:
        assert result.finished and result.error is None, result.events[-1:]
        assert result.ids == expected[prompt], prompt
    # The others were refused with 429, and at once: before any accepted stream ended.
    assert rejected, "no request was refused: the limit was not reached"
    assert all(r.status == 429 and r.body["error_type"] == "overloaded" for r in rejected), (
        {r.status for r in rejected})
    first_end = min(r.ended for _, r in accepted)
    assert max(r.answered for r in rejected) < first_end
    # The engine never held more than the limit, queued and running together.
    assert watch.scrapes > 0
    assert watch.peak_engine <= MAX_CONCURRENT and watch.peak_queue <= MAX_CONCURRENT

    idle = wait_idle(server)
    assert sample(idle, "shardgen_requests_total", outcome="success") - sample(
        before, "shardgen_requests_total", outcome="success") == len(accepted)
    assert sample(idle, "shardgen_requests_total", outcome="overloaded") - sample(
        before, "shardgen_requests_total", outcome="overloaded") == len(rejected)
    # ... and serves the next request as before.
    assert greedy_ids(server, PROMPTS[0], MAX_NEW_TOKENS) == expected[PROMPTS[0]]


def test_requests_below_the_limit_are_all_accepted(server: Server) -> None:
    """The limit counts requests in the engine, not requests ever made: sequential
    waves of MAX_CONCURRENT - 10 each all pass."""
    wave = MAX_CONCURRENT - 10

    async def waves() -> list[StreamResult]:
        out = []
        async with session() as client:
            for _ in range(2):
                out += await asyncio.gather(*(
                    stream(client, server, PROMPTS[i % len(PROMPTS)], max_new_tokens=4)
                    for i in range(wave)))
        return out

    started = time.monotonic()
    results = asyncio.run(waves())
    assert [r.status for r in results] == [200] * (2 * wave), time.monotonic() - started
    wait_idle(server)
    assert generate(server, PROMPTS[1], max_new_tokens=2).status_code == 200
