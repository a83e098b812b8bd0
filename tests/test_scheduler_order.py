"""The shortest-prefill policy (the default): which waiting requests a step starts first,
with the real BlockManager and a simulated shard (no I/O)."""

from __future__ import annotations

from test_scheduler_policy import chunks_of, drain, make, run, seq

from shardgen.router import scheduler as scheduler_module
from shardgen.router.block_manager import BlockManager
from shardgen.router.radix import block_hash, block_hashes
from shardgen.router.scheduler import Scheduler


def waiting_ids(scheduler: Scheduler) -> list[int]:
    return [s.request_id for s in scheduler._waiting]


def test_shorter_prompts_start_first_and_ties_keep_arrival_order():
    scheduler, _ = make(max_batch_prefill_tokens=12)
    scheduler.add(seq(1, 13))
    scheduler.add(seq(2, 4))
    scheduler.add(seq(3, 3))
    scheduler.add(seq(4, 4))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan)[:3] == [(3, 0, 3), (2, 0, 4), (4, 0, 4)]
    # Request 1 did not fit the budget left: it is chunked, 1 token now.
    assert chunks_of(plan)[3:] == [(1, 0, 1)]


def test_fcfs_keeps_arrival_order():
    scheduler, _ = make(max_batch_prefill_tokens=12, scheduling_policy="fcfs")
    for request_id, length in ((1, 9), (2, 4), (3, 3)):
        scheduler.add(seq(request_id, length))
    assert chunks_of(scheduler.schedule(0.0)) == [(1, 0, 9), (2, 0, 3)]


def test_a_prompt_whose_prefix_is_cached_counts_only_the_tokens_left():
    scheduler, blocks = make(block_size=4, max_batch_prefill_tokens=64)
    scheduler.add(seq(1, 21, max_new_tokens=1, first=0))
    drain(scheduler)                              # its 5 full blocks stay cached
    scheduler.add(seq(2, 10))                     # 10 tokens to compute
    scheduler.add(seq(3, 22, first=0))            # 20 cached, 2 to compute
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(3, 20, 2), (2, 0, 10)]
    blocks.check_invariants()


def test_shorter_prompts_go_first_but_the_step_is_still_filled():
    scheduler, _ = make(num_blocks=256, block_size=4, max_batch_prefill_tokens=64)
    for request_id in range(1, 4):
        scheduler.add(seq(request_id, 30))
    scheduler.add(seq(4, 5))
    # The budget left after the short one goes to the long ones, in arrival order.
    assert chunks_of(scheduler.schedule(0.0)) == [(4, 0, 5), (1, 0, 30), (2, 0, 29)]


def test_fcfs_takes_arrival_order():
    scheduler, _ = make(block_size=4, max_batch_prefill_tokens=64, scheduling_policy="fcfs")
    scheduler.add(seq(1, 5))
    scheduler.add(seq(2, 50))
    assert chunks_of(scheduler.schedule(0.0)) == [(1, 0, 5), (2, 0, 50)]


def test_a_request_passed_over_max_waiting_tokens_times_goes_first():
    scheduler, _ = make(num_blocks=256, block_size=4, max_batch_prefill_tokens=8,
                        max_waiting_tokens=2)
    scheduler.add(seq(1, 30, max_new_tokens=50))
    next_id = 2
    started = []
    for _ in range(4):
        # A shorter request that fills the budget arrives at every step.
        scheduler.add(seq(next_id, 8, max_new_tokens=50))
        next_id += 1
        plan = scheduler.schedule(0.0)
        started.append([c.seq.request_id for c in plan.chunks])
        run(scheduler, plan)
    # Passed over twice, request 1 then starts (chunked by the budget) ahead of the shorter one.
    assert started[:2] == [[2], [3]]
    assert started[2][0] == 1


def test_a_preempted_request_goes_first():
    scheduler, blocks = make(num_blocks=5, block_size=4, max_batch_prefill_tokens=64)
    for request_id in (1, 2, 3, 4):
        scheduler.add(seq(request_id, 3, max_new_tokens=6))
    run(scheduler, scheduler.schedule(0.0))
    plan = scheduler.schedule(0.0)
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)               # position 4 needs a block each: preemption
    assert plan.preempted
    preempted = plan.preempted[-1]
    scheduler.add(seq(9, 2))                     # shorter than the preempted one's tokens
    run(scheduler, plan)
    order = [seq_.request_id for seq_ in scheduler._admission_order()]
    assert order[0] == preempted.request_id
    blocks.check_invariants()


def test_only_a_window_of_the_queue_is_ordered(monkeypatch):
    monkeypatch.setattr(scheduler_module, "ADMISSION_WINDOW", 2)
    scheduler, _ = make(max_batch_prefill_tokens=64)
    for request_id, length in ((1, 9), (2, 8), (3, 2)):
        scheduler.add(seq(request_id, length))
    order = [s.request_id for s in scheduler._admission_order()]
    assert order == [2, 1, 3]


def test_block_hashes_chain_as_the_index_does():
    tokens = list(range(100, 137))
    hashes = block_hashes(tokens, 4, 9)
    parent = None
    for i, digest in enumerate(hashes):
        parent = block_hash(parent, tokens[4 * i:4 * i + 4])
        assert digest == parent
    # The estimate finds what lookup finds.
    blocks = BlockManager(16, 4)
    blocks.allocate(1, tokens, len(tokens))
    blocks.commit(1, tokens, 20)
    assert blocks.indexed_prefix_tokens(hashes) == blocks.lookup(tokens) == 20
    off = BlockManager(16, 4, enable_prefix_caching=False)
    assert off.indexed_prefix_tokens(hashes) == 0
