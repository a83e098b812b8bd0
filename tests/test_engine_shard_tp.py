"""The engine over two real tensor-parallel shard processes (gloo on CPU).

Every batch call must reach both ranks (each blocks in its collectives until the other
arrives), rank 0's answer must be the one used, and a rank that dies must fail the
requests in flight at once, although rank 0 then hangs in a collective.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from test_engine_fake_shard import uds_path
from test_engine_shard import (BLOCK_SIZE, MODEL, PROMPTS, SHARD_BLOCKS, engine_on, greedy,
                               token_ids, transformers_greedy)

from shardgen.router.requests import GenerationError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} is missing"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def two_shards(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    path = uds_path(tmp_path_factory.mktemp("tp"))
    port = _free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "shardgen.shard", "--model-id", str(MODEL), "--uds-path",
             path, "--device", "cpu", "--block-size", str(BLOCK_SIZE), "--num-blocks",
             str(SHARD_BLOCKS), "--distributed-timeout-s", "120", "--log-level", "warning"],
            env=env))
    try:
        yield path, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def test_two_shards_serve_the_reference_tokens_and_a_dead_rank_fails_fast(two_shards):
    path, processes = two_shards

    async def main() -> None:
        async with engine_on(path, num_shard=2, max_batch_prefill_tokens=8) as (engine, blocks):
            handles = [engine.submit(greedy(p, 12)) for p in PROMPTS]
            results = await asyncio.gather(*(token_ids(h) for h in handles))
            for prompt, tokens in zip(PROMPTS, results):
                assert tokens == transformers_greedy(tuple(prompt), 12)

            long = engine.submit(greedy(PROMPTS[0], 400))
            await long.__anext__()
            processes[1].send_signal(signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(GenerationError, match="shard 1 failed"):
                [event async for event in long]
            assert time.monotonic() - started < 10
            assert blocks.num_used_blocks == 0
    asyncio.run(main())
