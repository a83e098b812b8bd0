"""Out of memory and deadlines in the engine, over real gRPC against the fake shard.

The fake shard here "runs out of memory" (RESOURCE_EXHAUSTED, as the real shard's
interceptor answers torch.OutOfMemoryError) when a Prefill computes more prompt tokens
than it can hold: the engine fails that step's requests, halves its prefill budget so the
same prompt then goes through in chunks, and grows the budget back as steps succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from test_engine_fake_shard import FakeShard, FakeShards, reference_tokens, uds_path
from test_engine_loop import ids, prompt, request, serving, tokens_of, wait_idle

from shardgen.router.block_manager import BlockManager
from shardgen.router.client import connect_and_warm_up
from shardgen.router.engine import Engine
from shardgen.router.prefill_budget import DEFAULT_RECOVER_AFTER, PrefillBudget
from shardgen.router.requests import GenerationError, RequestTimeoutError
from shardgen.router.scheduler import Scheduler, SchedulerConfig, Sequence

pytestmark = pytest.mark.timeout(60)


def budgets_after_steps(budget: PrefillBudget, steps: int) -> list[int]:
    """The budget after each of `steps` successful steps."""
    seen = []
    for _ in range(steps):
        budget.step_succeeded()
        seen.append(budget.current)
    return seen


def test_the_budget_halves_to_its_floor_and_doubles_back() -> None:
    budget = PrefillBudget(100, floor=16, recover_after=3)
    assert budgets_after_steps(budget, 3) == [100, 100, 100]  # nothing to recover
    assert [budget.out_of_memory() for _ in range(4)] == [50, 25, 16, 16]
    assert budget.shrunk
    assert budgets_after_steps(budget, 10) == [16, 16, 32, 32, 32, 64, 64, 64, 100, 100]
    assert not budget.shrunk
    # Another failure while recovering halves again and restarts the count.
    budget.out_of_memory()
    budgets_after_steps(budget, 2)
    assert budget.out_of_memory() == 25
    assert budgets_after_steps(budget, 3) == [25, 25, 50]
    with pytest.raises(ValueError, match="at least 1"):
        PrefillBudget(0, floor=1)


def test_after_an_out_of_memory_the_scheduler_chunks_at_the_cut_budget() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64),
                          BlockManager(64, 4, enable_prefix_caching=False))
    assert scheduler.out_of_memory() == 32 and scheduler.prefill_budget == 32
    scheduler.add(Sequence(request_id=1, token_ids=list(range(3, 53)), prompt_len=50,
                           max_new_tokens=4))
    plan = scheduler.schedule(now=0.0)
    assert [(chunk.start, chunk.length) for chunk in plan.chunks] == [(0, 32)]


class ShardWithLittleMemory(FakeShard):
    """A fake shard whose Prefill runs out of memory past `max_prompt_tokens` tokens."""

    def __init__(self, num_blocks: int, max_prompt_tokens: int) -> None:
        super().__init__(num_blocks)
        self.max_prompt_tokens = max_prompt_tokens
        self.prompt_tokens_per_prefill: list[int] = []

    async def Prefill(self, request, context):
        computed = sum(r.chunk_len or len(r.input_ids) - r.cache_len
                       for r in request.batch.requests)
        self.prompt_tokens_per_prefill.append(computed)
        if computed > self.max_prompt_tokens:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"OutOfMemoryError: {computed} prompt tokens do not fit")
        return await super().Prefill(request, context)


@contextlib.asynccontextmanager
async def engine_over(shard: FakeShard, tmp_path: Path, **config: object
                      ) -> AsyncIterator[tuple[Engine, BlockManager]]:
    path = uds_path(tmp_path)
    shards = FakeShards(path, [shard])
    await shards.start()
    client, _, num_blocks, block_size = await connect_and_warm_up(
        path, 1, max_batch_prefill_tokens=64, max_batch_size=32, max_total_tokens=256,
        timeout_s=10)
    blocks = BlockManager(num_blocks, block_size)
    engine = Engine(client, SchedulerConfig(**config), blocks)
    await engine.start()
    try:
        yield engine, blocks
    finally:
        await engine.stop(drain_timeout_s=0.5)
        await client.close()
        await shards.stop()


def test_an_out_of_memory_step_fails_its_requests_and_shrinks_the_next_ones(
        tmp_path: Path) -> None:
    async def main() -> None:
        shard = ShardWithLittleMemory(256, max_prompt_tokens=40)
        async with engine_over(shard, tmp_path, max_batch_prefill_tokens=64) as (engine, blocks):
            long_prompt = prompt(50)
            with pytest.raises(GenerationError, match="RESOURCE_EXHAUSTED.*do not fit"):
                await tokens_of(engine.submit(request(long_prompt, 4)))
            assert engine._scheduler.prefill_budget == 32
            # The same prompt again: two chunks that fit, and the right tokens.
            again = await tokens_of(engine.submit(request(long_prompt, 4)))
            assert ids(again) == reference_tokens(long_prompt, 4, ignore_eos=True)
            assert shard.prompt_tokens_per_prefill[-2:] == [32, 18]
            # Enough successful steps give the whole budget back.
            steps = DEFAULT_RECOVER_AFTER + 4
            await tokens_of(engine.submit(request(prompt(5), steps)))
            assert engine._scheduler.prefill_budget == 64
            await asyncio.sleep(0.05)  # the loop frees the last blocks after the last event
            assert blocks.num_used_blocks == 0
    asyncio.run(main())


def test_a_request_past_its_deadline_fails_with_a_timeout(tmp_path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.01
            late = served.engine.submit(request(prompt(5), 10_000,
                                                deadline=time.monotonic() + 0.2))
            on_time = served.engine.submit(request(prompt(6), 5))
            with pytest.raises(RequestTimeoutError, match="passed its deadline"):
                await tokens_of(late)
            assert ids(await tokens_of(on_time)) == reference_tokens(prompt(6), 5,
                                                                     ignore_eos=True)
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())
