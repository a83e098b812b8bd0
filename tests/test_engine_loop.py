"""The engine end to end over real gRPC, against the contract-checking fake shard.

The fake reads every token's context back from its paged KV store where the router's block
tables point, so these tests fail on a wrong block, slot, cache_len or generated_offset, not
only on a wrong token count. The same behaviours against the real shard process are in
test_engine_shard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from test_engine_fake_shard import (EOS, VOCAB, FakeShard, FakeShards, reference_tokens,
                                    uds_path)

from shardgen.router.block_manager import BlockManager
from shardgen.router.engine import Engine, EngineStoppedError, RequestHandle, SchedulerConfig
from shardgen.router.client import connect_and_warm_up
from shardgen.router.metrics import Metrics
from shardgen.router.requests import (FinishReason, GenerationError, GenerationRequest,
                                      PrefillEvent, QueueFullError, SamplingParams,
                                      StoppingParams, TokenEvent)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Served:
    engine: Engine
    shards: FakeShards
    blocks: BlockManager

    @property
    def shard(self) -> FakeShard:
        return self.shards.shards[0]


@contextlib.asynccontextmanager
async def serving(tmp_path, *, num_blocks: int = 256, num_shard: int = 1,
                  metrics: Metrics | None = None, **config: object) -> AsyncIterator[Served]:
    path = uds_path(tmp_path)
    shards = FakeShards(path, [FakeShard(num_blocks, rank=rank) for rank in range(num_shard)])
    await shards.start()
    client, _, num_blocks, block_size = await connect_and_warm_up(
        path, num_shard, max_batch_prefill_tokens=64, max_batch_size=32, max_total_tokens=256,
        timeout_s=10)
    blocks = BlockManager(num_blocks, block_size)
    engine = Engine(client, SchedulerConfig(**config), blocks, metrics=metrics)
    await engine.start()
    try:
        yield Served(engine, shards, blocks)
    finally:
        await engine.stop(drain_timeout_s=0.5)
        await client.close()
        await shards.stop()


def request(prompt: list[int], max_new_tokens: int, *, seed: int = 0, do_sample: bool = False,
            ignore_eos: bool = True, **fields: object) -> GenerationRequest:
    return GenerationRequest(
        input_ids=prompt, sampling=SamplingParams(do_sample=do_sample, seed=seed),
        stopping=StoppingParams(max_new_tokens=max_new_tokens, ignore_eos_token=ignore_eos),
        **fields)


async def tokens_of(handle: RequestHandle) -> list[TokenEvent]:
    events = [event async for event in handle]
    assert all(isinstance(event, TokenEvent) for event in events)
    assert events[-1].finish_reason is not None
    assert all(event.finish_reason is None for event in events[:-1])
    return events


def ids(events: list[TokenEvent]) -> list[int]:
    return [event.id for event in events]


def prompt(n: int, start: int = 3) -> list[int]:
    return [(start + 7 * i) % (VOCAB - 3) + 3 for i in range(n)]


async def wait_idle(served: Served) -> None:
    for _ in range(100):
        if served.engine.running_size == 0 and served.engine.queue_size == 0:
            break
        await asyncio.sleep(0.01)
    # The loop frees blocks at its next iteration after a cancel.
    await asyncio.sleep(0.05)


def test_one_request_streams_the_reference_tokens(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            events = await tokens_of(served.engine.submit(request(prompt(9), 12, top_n_tokens=2)))
            assert ids(events) == reference_tokens(prompt(9), 12, ignore_eos=True)
            assert events[-1].finish_reason is FinishReason.LENGTH
            first = events[0]
            assert first.top_tokens == ((first.id, -0.5), ((first.id + 1) % VOCAB, -1.5))
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())


def test_an_eos_token_ends_the_stream_with_its_reason(tmp_path):
    # Find a prompt whose reference generation hits EOS early.
    candidates = (prompt(6, start) for start in range(200))
    eos_prompt = next(p for p in candidates if len(reference_tokens(p, 40)) < 40)
    expected = reference_tokens(eos_prompt, 40)
    assert expected[-1] == EOS

    async def main() -> None:
        async with serving(tmp_path) as served:
            events = await tokens_of(served.engine.submit(request(eos_prompt, 40,
                                                                  ignore_eos=False)))
            assert ids(events) == expected
            assert events[-1].finish_reason is FinishReason.EOS_TOKEN
    asyncio.run(main())


def test_concurrent_requests_all_complete_and_equal_prompts_give_equal_tokens(tmp_path):
    # Six distinct requests, each submitted five times, interleaved.
    kinds = [(prompt(3 + k, start=k), 5 + 2 * k, k) for k in range(6)]
    order = [k for _ in range(5) for k in range(6)]

    async def main() -> None:
        async with serving(tmp_path, max_batch_prefill_tokens=40) as served:
            handles = []
            for k in order:
                p, max_new, seed = kinds[k]
                handles.append(served.engine.submit(request(p, max_new, seed=seed,
                                                            do_sample=True)))
            results = await asyncio.gather(*(tokens_of(h) for h in handles))
            for k, events in zip(order, results):
                p, max_new, seed = kinds[k]
                assert ids(events) == reference_tokens(p, max_new, seed=seed, do_sample=True,
                                                       ignore_eos=True)
            assert served.shard.stats.max_step_requests > 6
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
            served.blocks.check_invariants()
    asyncio.run(main())


def test_a_long_prompt_is_chunked_while_the_running_request_keeps_decoding(tmp_path):
    long_prompt = prompt(45, start=11)

    async def main() -> None:
        async with serving(tmp_path, max_batch_prefill_tokens=16) as served:
            running = served.engine.submit(request(prompt(4), 30))
            first = await running.__anext__()
            long = served.engine.submit(request(long_prompt, 6, prefill_logprobs=True))
            events = [event async for event in long]
            prefill, tokens = events[0], events[1:]
            assert isinstance(prefill, PrefillEvent)
            # One prompt-logprobs event for the whole prompt, however many chunks it took.
            assert prefill.ids == tuple(long_prompt)
            assert prefill.logprobs == tuple(-float(p) for p in range(45))
            assert ids(tokens) == reference_tokens(long_prompt, 6, ignore_eos=True)
            rest = [event async for event in running]
            assert ids([first] + rest) == reference_tokens(prompt(4), 30, ignore_eos=True)
            long_chunks = [(start, length) for rid, start, length in served.shard.stats.chunks
                           if rid == long.id]
            assert long_chunks == [(0, 16), (16, 16), (32, 13)]
            # Every step computing a chunk also decoded the running request.
            for decoded, chunks in served.shard.stats.steps:
                if any(rid == long.id for rid, _, _ in chunks):
                    assert running.id in decoded
    asyncio.run(main())


def test_a_repeated_prompt_reuses_the_cached_prefix(tmp_path):
    shared = prompt(21, start=5)

    metrics = Metrics()

    async def main() -> None:
        async with serving(tmp_path, metrics=metrics) as served:
            first = ids(await tokens_of(served.engine.submit(request(shared, 4))))
            second = served.engine.submit(request(shared + [9, 9], 4))
            tokens = ids(await tokens_of(second))
            assert first == reference_tokens(shared, 4, ignore_eos=True)
            assert tokens == reference_tokens(shared + [9, 9], 4, ignore_eos=True)
            # 20 tokens (5 blocks) came from the first request's KV, read where it wrote them.
            assert [c for c in served.shard.stats.chunks if c[0] == second.id] == [
                (second.id, 20, 3)]
            assert metrics.registry.get_sample_value("shardgen_prefix_cache_hit_tokens_total") == 20
            decode_steps = metrics.registry.get_sample_value("shardgen_batch_size_count",
                                                             {"method": "decode"})
            assert decode_steps == served.shard.stats.decode_calls == 6
    asyncio.run(main())


def test_a_tiny_cache_preempts_and_recomputes_and_every_request_completes(tmp_path):
    # 11 usable blocks of 4 tokens for 12 requests that each grow to ~25 tokens.
    specs = [(prompt(5 + i % 6, start=i), 12 + i % 8, i) for i in range(12)]

    metrics = Metrics()

    async def main() -> None:
        async with serving(tmp_path, num_blocks=12, waiting_served_ratio=0.0,
                           metrics=metrics) as served:
            handles = [served.engine.submit(request(p, n, seed=seed, do_sample=True))
                       for p, n, seed in specs]
            results = await asyncio.gather(*(tokens_of(h) for h in handles))
            for (p, n, seed), events in zip(specs, results):
                assert ids(events) == reference_tokens(p, n, seed=seed, do_sample=True,
                                                       ignore_eos=True)
            # Some requests were recomputed after generating tokens.
            assert max(served.shard.stats.generated_offsets) > 0
            assert metrics.registry.get_sample_value("shardgen_preemptions_total") > 0
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
            served.blocks.check_invariants()
    asyncio.run(main())


def test_cancel_ends_the_stream_and_frees_the_blocks(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.005
            other = served.engine.submit(request(prompt(6, start=2), 40))
            handle = served.engine.submit(request(prompt(7), 1000))
            received = [await handle.__anext__() for _ in range(3)]
            assert ids(received) == reference_tokens(prompt(7), 3, ignore_eos=True)
            handle.cancel()
            handle.cancel()
            assert [event async for event in handle] == []
            # The other request is not disturbed.
            assert ids(await tokens_of(other)) == reference_tokens(prompt(6, start=2), 40,
                                                                   ignore_eos=True)
            await wait_idle(served)
            assert served.shard.stats.filter_calls + served.shard.stats.clear_calls >= 1
            assert served.shard.requests == {} and served.blocks.num_used_blocks == 0
            served.blocks.check_invariants()
    asyncio.run(main())


def test_a_step_the_shard_rejects_fails_only_its_requests(tmp_path):
    async def main() -> None:
        async with serving(tmp_path, max_batch_size=1) as served:
            bad = served.engine.submit(request([5, VOCAB + 1, 6], 4))
            queued = served.engine.submit(request(prompt(5), 4))
            with pytest.raises(GenerationError, match="shard 0 failed Prefill: INVALID_ARGUMENT"):
                [event async for event in bad]
            assert ids(await tokens_of(queued)) == reference_tokens(prompt(5), 4,
                                                                    ignore_eos=True)
            later = served.engine.submit(request(prompt(8), 5))
            assert ids(await tokens_of(later)) == reference_tokens(prompt(8), 5, ignore_eos=True)
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())


def test_a_bad_request_fails_alone_and_those_sharing_its_step_are_recomputed(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.002
            good = [served.engine.submit(request(prompt(6, start=start), 30, seed=start,
                                                 do_sample=True))
                    for start in (1, 2)]
            firsts = await asyncio.gather(*(handle.__anext__() for handle in good))
            bad = served.engine.submit(request([5, VOCAB + 1, 6], 4))
            with pytest.raises(GenerationError, match="shard 0 failed Prefill: INVALID_ARGUMENT"):
                [event async for event in bad]
            for start, first, handle in zip((1, 2), firsts, good):
                # Tokens from before the failure and after the recomputation: the same
                # sampled sequence as a request that never met a fault.
                assert [first.id, *ids(await tokens_of(handle))] == reference_tokens(
                    prompt(6, start=start), 30, ignore_eos=True, seed=start, do_sample=True)
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
            served.blocks.check_invariants()
    asyncio.run(main())


def test_a_dead_shard_fails_requests_at_once_even_when_another_hangs(tmp_path):
    async def main() -> None:
        async with serving(tmp_path, num_shard=2) as served:
            handle = served.engine.submit(request(prompt(5), 500))
            await handle.__anext__()
            served.shards.shards[0].hang = True      # blocked in a collective with rank 1 ...
            await served.shards.stop_rank(1)         # ... which died
            started = time.monotonic()
            # The step in flight when rank 1 stopped is cancelled by its server; one sent
            # after finds nobody listening.
            with pytest.raises(GenerationError, match="shard 1 failed .*(UNAVAILABLE|CANCELLED)"):
                [event async for event in handle]
            assert time.monotonic() - started < 5
            served.shards.shards[0].hang = False
            # Later requests fail too while the shard is down, but quickly.
            with pytest.raises(GenerationError, match="shard 1"):
                await tokens_of(served.engine.submit(request(prompt(5), 3)))
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())


def test_submit_refuses_what_cannot_be_served(tmp_path):
    async def main() -> None:
        async with serving(tmp_path, num_blocks=6, max_concurrent_requests=2) as served:
            with pytest.raises(ValueError, match="21 tokens and needs 6 KV blocks"):
                served.engine.submit(request(prompt(21), 1))
            served.shard.hang = True
            served.engine.submit(request(prompt(3), 2))
            served.engine.submit(request(prompt(4), 2))
            with pytest.raises(QueueFullError, match=r"2 requests .* \(max_concurrent_requests=2\)"):
                served.engine.submit(request(prompt(3), 2))
            served.shard.hang = False
    asyncio.run(main())


def test_stop_drains_running_requests_then_refuses_new_ones(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.002
            handle = served.engine.submit(request(prompt(5), 20))
            stopping = asyncio.ensure_future(served.engine.stop(drain_timeout_s=10))
            events = await tokens_of(handle)
            await stopping
            assert ids(events) == reference_tokens(prompt(5), 20, ignore_eos=True)
            with pytest.raises(EngineStoppedError):
                served.engine.submit(request(prompt(5), 2))
    asyncio.run(main())


def test_stop_fails_what_did_not_finish_in_the_drain_time(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.01
            handle = served.engine.submit(request(prompt(5), 10_000))
            await handle.__anext__()
            await served.engine.stop(drain_timeout_s=0.1)
            with pytest.raises(GenerationError, match="stopped before the request finished"):
                [event async for event in handle]
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())


def test_a_request_past_its_deadline_fails(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            served.shard.step_delay_s = 0.01
            handle = served.engine.submit(request(prompt(5), 10_000,
                                                  deadline=time.monotonic() + 0.2))
            with pytest.raises(GenerationError, match="passed its deadline"):
                [event async for event in handle]
            await wait_idle(served)
            assert served.blocks.num_used_blocks == 0 and served.shard.requests == {}
    asyncio.run(main())


def test_a_bug_in_a_step_fails_the_requests_in_flight_but_not_the_loop(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as served:
            handle = served.engine.submit(request(prompt(5), 50))
            await handle.__anext__()
            scheduler = served.engine._scheduler
            schedule = scheduler.schedule

            def broken(now: float) -> object:
                scheduler.schedule = schedule
                raise RuntimeError("a bug")
            scheduler.schedule = broken
            with pytest.raises(GenerationError, match="internal error"):
                [event async for event in handle]
            assert ids(await tokens_of(served.engine.submit(request(prompt(6), 4)))) == (
                reference_tokens(prompt(6), 4, ignore_eos=True))
            assert served.blocks.num_used_blocks == 0
    asyncio.run(main())
