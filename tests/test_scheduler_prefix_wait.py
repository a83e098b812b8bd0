"""A waiting request that shares prompt blocks with a prompt in flight waits for them to be
committed instead of computing them again (Scheduler._admit); with the real BlockManager."""

from __future__ import annotations

import pytest
from test_scheduler_policy import chunks_of, drain, make, run, seq

from shardgen.router import scheduler as scheduler_module
from shardgen.router.block_manager import BlockManager
from shardgen.router.scheduler import Scheduler, SchedulerConfig, Sequence

PREFIX = 12   # 3 blocks of 4 tokens


def grouped(request_id: int, tail_len: int = 3, prefix_len: int = PREFIX, **fields: object
            ) -> Sequence:
    """A request whose prompt is the group's prefix, then a tail of its own."""
    s = seq(request_id, prefix_len + tail_len, first=0, **fields)
    s.token_ids[prefix_len:] = [1000 + 10 * request_id + i for i in range(tail_len)]
    return s


def waiting_ids(scheduler: Scheduler) -> list[int]:
    return [s.request_id for s in scheduler._waiting]


def test_requests_arriving_together_compute_their_shared_prefix_once():
    scheduler, blocks = make(block_size=4, scheduling_policy="fcfs")
    scheduler.add(grouped(1))
    scheduler.add(grouped(2))
    scheduler.add(seq(4, 8))          # unrelated: starts beside the first one
    scheduler.add(grouped(3))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 15), (4, 0, 8)]
    assert waiting_ids(scheduler) == [2, 3]
    run(scheduler, plan)

    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, PREFIX, 3), (3, PREFIX, 3)]
    provider = scheduler.get(1).blocks[:3]
    assert [c.seq.blocks[:3] for c in plan.chunks] == [provider, provider]
    assert blocks.prefix_hit_tokens_total == 2 * PREFIX
    run(scheduler, plan)
    drain(scheduler)
    assert blocks.num_used_blocks == 0
    blocks.check_invariants()


def test_a_request_waits_for_every_chunk_of_the_shared_prefix():
    scheduler, blocks = make(block_size=4, max_batch_prefill_tokens=8)
    scheduler.add(grouped(1, tail_len=2, prefix_len=20))    # 22 tokens: chunks of 8, 8, 6
    scheduler.add(grouped(2, tail_len=2, prefix_len=20))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 8)]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 8, 8)]
    run(scheduler, plan)
    scheduler.add(seq(3, 2))
    # The last chunk leaves budget for request 2, but only 16 of its 20 shared tokens are
    # committed: it waits, and the unrelated request 3 behind it starts.
    assert blocks.lookup(scheduler.get(2).token_ids) == 16
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 16, 6), (3, 0, 2)]
    run(scheduler, plan)
    assert chunks_of(scheduler.schedule(0.0)) == [(2, 20, 2)]


def test_without_prefix_caching_nobody_waits():
    blocks = BlockManager(64, 4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(enable_prefix_caching=False), blocks)
    for request_id in (1, 2, 3):
        scheduler.add(grouped(request_id))
    assert chunks_of(scheduler.schedule(0.0)) == [(1, 0, 15), (2, 0, 15), (3, 0, 15)]


def test_prompt_logprobs_on_either_side_do_not_wait():
    scheduler, _ = make(block_size=4)
    scheduler.add(grouped(1))
    scheduler.add(grouped(2, prefill_logprobs=True))   # computes its whole prompt anyway
    assert chunks_of(scheduler.schedule(0.0)) == [(1, 0, 15), (2, 0, 15)]

    scheduler, _ = make(block_size=4)
    scheduler.add(grouped(1, prefill_logprobs=True))   # its blocks are never indexed
    scheduler.add(grouped(2))
    scheduler.add(grouped(3))                          # waits for request 2's
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 15), (2, 0, 15)]
    run(scheduler, plan)
    assert chunks_of(scheduler.schedule(0.0)) == [(3, PREFIX, 3)]


def test_a_request_whose_provider_fails_computes_the_prefix_itself():
    scheduler, blocks = make(block_size=4)
    scheduler.add(grouped(1))
    scheduler.add(grouped(2))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 15)]
    # The step fails with request 1 alone in it: it is removed, nothing was committed.
    failed, _ = scheduler.abort_step(plan, isolate=True)
    assert [s.request_id for s in failed] == [1] and scheduler.get(1) is None
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, 0, 15)]
    run(scheduler, plan)
    assert blocks.prefix_hit_tokens_total == 0


def test_a_step_passes_over_a_bounded_number_of_waiting_requests(monkeypatch):
    monkeypatch.setattr(scheduler_module, "MAX_DEFERRED_PER_STEP", 2)
    scheduler, _ = make(block_size=4, scheduling_policy="fcfs")
    for request_id in (1, 2, 3, 4):
        scheduler.add(grouped(request_id))
    scheduler.add(seq(5, 4))
    plan = scheduler.schedule(0.0)
    # Requests 2 and 3 are passed over; the scan stops there, request 5 waits too.
    assert chunks_of(plan) == [(1, 0, 15)]
    assert waiting_ids(scheduler) == [2, 3, 4, 5]
    run(scheduler, plan)
    assert chunks_of(scheduler.schedule(0.0)) == [(2, PREFIX, 3), (3, PREFIX, 3),
                                                  (4, PREFIX, 3), (5, 0, 4)]


@pytest.mark.parametrize("blocks_short", [False, True])
def test_waiting_requests_count_towards_the_served_ratio_and_keep_their_order(blocks_short):
    # 3 running requests with ratio 1.0 want 3 new ones at once.
    scheduler, blocks = make(num_blocks=11 if blocks_short else 64, block_size=4,
                             waiting_served_ratio=1.0, max_waiting_tokens=100,
                             scheduling_policy="fcfs")
    for request_id in (11, 12, 13):
        scheduler.add(seq(request_id, 3, max_new_tokens=50))
    run(scheduler, scheduler.schedule(0.0))
    scheduler.add(grouped(1))
    scheduler.add(grouped(2))
    scheduler.add(seq(3, 8))
    plan = scheduler.schedule(0.0)
    if blocks_short:
        # Request 3 does not fit beside request 1: 1 started + 1 waiting < 3, request 1 is
        # taken back and the queue is as it was.
        assert not plan.chunks and waiting_ids(scheduler) == [1, 2, 3]
        assert scheduler.get(1).blocks == [] and blocks.num_used_blocks == 6
        blocks.check_invariants()
    else:
        # Request 2 waits for request 1's prefix, and counts as joining with it.
        assert chunks_of(plan) == [(1, 0, 15), (3, 0, 8)] and waiting_ids(scheduler) == [2]
