"""ShardClient over real gRPC against fake shards: broadcast, rank 0's answer, errors that
name the rank, failing fast, deadlines, start-up and warm-up."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from test_engine_fake_shard import FakeShard, FakeShards, uds_path

from shardgen.proto import generate_pb2
from shardgen.router.client import ShardClient, ShardError, connect_and_warm_up

pytestmark = pytest.mark.timeout(60)


class QuietShard(FakeShard):
    """A rank other than 0 that computes the step but returns no generations."""

    async def Prefill(self, request, context):
        response = await super().Prefill(request, context)
        del response.generations[:]
        return response


class RejectingShard(FakeShard):
    async def Health(self, request, context):
        await context.abort(grpc.StatusCode.INTERNAL, "deep probe failed: NaN in block 0")


def prefill_request(request_id: int = 1) -> generate_pb2.Batch:
    return generate_pb2.Batch(id=1, requests=[generate_pb2.Request(
        id=request_id, input_ids=[5, 6, 7], blocks=[1], slots=[4, 5, 6],
        stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=2))])


def run_with_shards(tmp_path, shards: list[FakeShard], body, **client_args) -> None:
    async def main() -> None:
        path = uds_path(tmp_path)
        served = FakeShards(path, shards)
        await served.start()
        client = ShardClient(path, len(shards), **client_args)
        try:
            await body(client, served)
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())


def test_a_step_goes_to_every_shard_and_rank_0_answers(tmp_path):
    shards = [FakeShard(8), QuietShard(8, rank=1)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        response = await client.prefill(prefill_request())
        assert [g.request_id for g in response.generations] == [1]
        assert [s.stats.prefill_calls for s in shards] == [1, 1]
        batch = await client.filter_batch(response.batch.id, [])
        assert list(batch.request_ids) == []
        await client.clear_cache()
        assert [s.stats.clear_calls for s in shards] == [1, 1]
        assert (await client.info()).rank == 0
    run_with_shards(tmp_path, shards, body)


def test_a_step_is_sent_when_called_not_when_awaited(tmp_path):
    """The engine hands the last step's tokens to their streams between sending a step and
    awaiting it: the shards must already have the step by then."""
    shards = [FakeShard(8), FakeShard(8, rank=1)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        answer = client.prefill(prefill_request())
        for _ in range(500):
            if all(s.stats.prefill_calls == 1 for s in shards):
                break
            await asyncio.sleep(0.01)
        assert [s.stats.prefill_calls for s in shards] == [1, 1]
        response = await answer
        assert [g.request_id for g in response.generations] == [1]
    run_with_shards(tmp_path, shards, body)


def test_a_failing_shard_is_named_with_its_grpc_status(tmp_path):
    shards = [FakeShard(8), RejectingShard(8, rank=1)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        with pytest.raises(ShardError) as caught:
            await client.health(deep=True)
        assert str(caught.value) == ("shard 1 failed Health: INTERNAL: deep probe failed: "
                                     "NaN in block 0")
        assert caught.value.rank == 1 and caught.value.code is grpc.StatusCode.INTERNAL
    run_with_shards(tmp_path, shards, body)


def test_a_dead_shard_fails_the_call_without_waiting_for_a_hung_one(tmp_path):
    shards = [FakeShard(8), FakeShard(8, rank=1)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        shards[0].hang = True
        await served.stop_rank(1)
        started = time.monotonic()
        with pytest.raises(ShardError, match="shard 1 failed Prefill: UNAVAILABLE"):
            await client.prefill(prefill_request())
        assert time.monotonic() - started < 5
        shards[0].hang = False
    run_with_shards(tmp_path, shards, body)


def test_a_step_that_hangs_everywhere_ends_at_the_deadline(tmp_path):
    shards = [FakeShard(8)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        shards[0].hang = True
        with pytest.raises(ShardError, match="shard 0 failed Decode: DEADLINE_EXCEEDED"):
            await client.decode([generate_pb2.CachedBatch(id=1, request_ids=[1])])
        shards[0].hang = False
    run_with_shards(tmp_path, shards, body, step_timeout_s=0.3)


def test_connect_waits_for_late_shards_and_takes_the_smallest_cache(tmp_path):
    async def main() -> None:
        path = uds_path(tmp_path)
        served = FakeShards(path, [FakeShard(40, block_size=16), FakeShard(30, block_size=16,
                                                                             rank=1)])
        starting = asyncio.get_running_loop().call_later(
            0.5, lambda: asyncio.ensure_future(served.start()))
        client, info, num_blocks, block_size = await connect_and_warm_up(
            path, 2, max_batch_prefill_tokens=64, max_batch_size=4, max_total_tokens=128,
            timeout_s=10)
        try:
            assert (info.model_id, num_blocks, block_size) == ("fake", 30, 16)
        finally:
            starting.cancel()
            await client.close()
            await served.stop()
    asyncio.run(main())


def test_shards_that_disagree_on_the_block_size_are_refused(tmp_path):
    shards = [FakeShard(40, block_size=16), FakeShard(40, block_size=8, rank=1)]

    async def body(client: ShardClient, served: FakeShards) -> None:
        with pytest.raises(ShardError, match=r"disagree on block_size: \[16, 8\]"):
            await client.warmup(64, 4, 128, timeout_s=5)
    run_with_shards(tmp_path, shards, body)


def test_connect_gives_up_when_no_shard_answers(tmp_path):
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(ShardError, match="shard 0 failed Health"):
            await connect_and_warm_up(uds_path(tmp_path), 1, max_batch_prefill_tokens=64,
                                      max_batch_size=4, max_total_tokens=128, timeout_s=1.0)
        assert time.monotonic() - started < 5
    asyncio.run(main())
