"""The engine planning prompts a step ahead (admit_ahead) over real gRPC, against a shard
that runs every step ahead (`--run-ahead`, as on CUDA), on stories260K on CPU.

Greedy tokens must equal transformers' on the same checkpoint while most prefill steps are
the ones the shard ran ahead (its run-ahead counts say so); requests cancelled while
planned ahead, and one the shard rejects, disturb nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from shard_rpc import InProcessShard, running_shard
from test_engine_shard import (BLOCK_SIZE, MODEL, PROMPTS, SHARD_BLOCKS,
                               all_tokens_then_settled, engine_on, greedy, token_ids,
                               transformers_greedy)

from shardgen.router.requests import GenerationError

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} is missing"),
]


@pytest.fixture(scope="module")
def shard() -> Iterator[InProcessShard]:
    with running_shard("--run-ahead", "--block-size", str(BLOCK_SIZE),
                       "--num-blocks", str(SHARD_BLOCKS)) as served:
        yield served


def test_the_shard_says_it_runs_ahead(shard: InProcessShard) -> None:
    from shardgen.proto import generate_pb2
    assert shard.stub.Info(generate_pb2.InfoRequest()).runs_ahead


def test_prompts_planned_ahead_give_the_reference_tokens(shard: InProcessShard) -> None:
    shard.runner.run_ahead_counts.clear()

    async def main() -> list[list[int]]:
        # 24 prompts of 5-13 tokens at 32 prompt tokens per step, none of them from the
        # prefix cache: a queue of ~8 steps.
        async with engine_on(shard.config.uds_path, max_batch_prefill_tokens=32,
                             enable_prefix_caching=False, admit_ahead=True) as (engine, blocks):
            handles = [engine.submit(greedy(PROMPTS[i % 4], 16)) for i in range(24)]
            return await all_tokens_then_settled(engine, blocks, handles)
    results = asyncio.run(main())
    for i, tokens in enumerate(results):
        assert tokens == transformers_greedy(tuple(PROMPTS[i % 4]), 16)
    counts = shard.runner.run_ahead_counts
    assert counts["adopted with prompts"] >= 6, counts
    assert counts["discarded"] <= 2, counts


def test_a_long_prompt_chunked_ahead_gives_the_tokens_of_an_unchunked_one(shard: InProcessShard) -> None:
    long_prompt = PROMPTS[3] + PROMPTS[1][1:] + PROMPTS[2][1:] + PROMPTS[0][1:]

    async def main() -> list[int]:
        async with engine_on(shard.config.uds_path, max_batch_prefill_tokens=7,
                             enable_prefix_caching=False, admit_ahead=True) as (engine, _):
            running = engine.submit(greedy(PROMPTS[0], 30))
            await running.__anext__()
            tokens = await token_ids(engine.submit(greedy(long_prompt, 12)))
            [event async for event in running]
            return tokens
    assert asyncio.run(main()) == transformers_greedy(tuple(long_prompt), 12)


def test_cancels_and_a_rejected_request_while_planned_ahead_spare_the_others(
        shard: InProcessShard) -> None:
    async def main() -> list[list[int]]:
        async with engine_on(shard.config.uds_path, max_batch_prefill_tokens=16,
                             admit_ahead=True) as (engine, blocks):
            handles = [engine.submit(greedy(PROMPTS[i % 4], 12)) for i in range(12)]
            bad = engine.submit(greedy([1, 5000, 7], 4))       # a token outside the vocabulary
            doomed = [engine.submit(greedy(PROMPTS[i % 4], 40)) for i in range(4)]
            for handle in doomed:
                handle.cancel()
            with pytest.raises(GenerationError, match="shard 0 failed"):
                [event async for event in bad]
            return await all_tokens_then_settled(engine, blocks, handles)
    results = asyncio.run(main())
    for i, tokens in enumerate(results):
        assert tokens == transformers_greedy(tuple(PROMPTS[i % 4]), 12)
