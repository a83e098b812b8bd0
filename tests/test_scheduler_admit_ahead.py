"""admit_ahead: each plan carries the prompt chunks of the step after it (the shards compute
them in the step they run ahead), and the next schedule() plans exactly those unless
requests leave meanwhile. Real BlockManager, a simulated shard outcome (no I/O)."""

from __future__ import annotations

import random

import pytest
from test_scheduler_policy import chunks_of, drain, make, run, seq

from shardgen.router.scheduler import StepPlan


def next_of(plan: StepPlan) -> list[tuple[int, int, int]]:
    return [(c.seq.request_id, c.start, c.length) for c in plan.next_chunks]


def test_a_deep_queue_is_admitted_one_step_ahead_and_the_next_step_keeps_to_it():
    scheduler, _ = make(max_batch_prefill_tokens=20, admit_ahead=True)
    for request_id in range(1, 6):
        scheduler.add(seq(request_id, 10, max_new_tokens=8))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 10), (2, 0, 10)]
    assert next_of(plan) == [(3, 0, 10), (4, 0, 10)]      # admitted now, blocks and all
    assert all(c.seq.blocks for c in plan.next_chunks)
    run(scheduler, plan)
    scheduler.add(seq(6, 4, max_new_tokens=8))             # arrives between the two steps

    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(3, 0, 10), (4, 0, 10)]     # as planned: 6 does not join
    assert [s.request_id for s in plan.decoding] == [1, 2]
    assert next_of(plan) == [(6, 0, 4), (5, 0, 10)]      # shortest prompt first
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(6, 0, 4), (5, 0, 10)]
    assert next_of(plan) == []                             # nothing left to plan
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert not plan.chunks and [s.request_id for s in plan.decoding] == [1, 2, 3, 4, 6, 5]


def test_a_long_prompt_continues_in_the_chunk_planned_ahead():
    scheduler, _ = make(max_batch_prefill_tokens=8, admit_ahead=True, scheduling_policy="fcfs")
    scheduler.add(seq(1, 19))
    scheduler.add(seq(2, 6))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 8)] and next_of(plan) == [(1, 8, 8)]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 8, 8)] and next_of(plan) == [(1, 16, 3), (2, 0, 5)]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 16, 3), (2, 0, 5)] and next_of(plan) == [(2, 5, 1)]


def test_the_rows_of_prompts_finishing_now_count_against_the_next_steps_batch_size():
    scheduler, _ = make(max_batch_prefill_tokens=40, max_batch_size=3, admit_ahead=True)
    for request_id in range(1, 5):
        scheduler.add(seq(request_id, 6, max_new_tokens=8))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 6), (2, 0, 6), (3, 0, 6)]
    assert next_of(plan) == []          # the three decode in the next step: no room for 4
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert not plan.chunks and len(plan.decoding) == 3


def test_a_request_planned_ahead_that_is_cancelled_leaves_the_next_step_and_its_blocks():
    scheduler, blocks = make(max_batch_prefill_tokens=10, admit_ahead=True)
    for request_id in (1, 2, 3):
        scheduler.add(seq(request_id, 10, max_new_tokens=3))
    plan = scheduler.schedule(0.0)
    assert next_of(plan) == [(2, 0, 10)]
    used = blocks.num_used_blocks
    run(scheduler, plan)
    scheduler.remove(2)
    assert blocks.num_used_blocks < used
    plan = scheduler.schedule(0.0)
    # The step differs from the one planned (the shards discard theirs); the queue admits
    # at once again rather than leaving the step without prompts.
    assert chunks_of(plan) == [] or chunks_of(plan) == [(3, 0, 10)]
    drain(scheduler)
    assert blocks.num_used_blocks == 0
    blocks.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_random_traffic_keeps_to_every_plan_ahead_and_loses_nothing(seed):
    """With room enough for no preemption and no request leaving early, every step computes
    exactly the chunks the step before planned for it; every request completes."""
    rng = random.Random(seed)
    scheduler, blocks = make(num_blocks=400, block_size=4, admit_ahead=True,
                             max_batch_prefill_tokens=rng.choice([8, 16, 40]),
                             max_batch_size=rng.choice([None, 4, 9]))
    expected: dict[int, int] = {}
    done: dict[int, int] = {}
    planned: list[tuple[int, int, int]] | None = None
    ahead_steps = 0
    next_id = 1
    for step in range(3000):
        # A burst first (a queue deeper than the budget), then arrivals now and then.
        while next_id <= 40 and (next_id <= 15 or rng.random() < 0.3):
            s = seq(next_id, rng.randint(1, 30), rng.randint(1, 10), first=rng.choice([None, seed]))
            scheduler.add(s)
            expected[next_id] = s.max_new_tokens
            next_id += 1
        plan = scheduler.schedule(float(step))
        assert not plan.preempted and not plan.failed
        if planned:
            assert chunks_of(plan) == planned, step
            ahead_steps += 1
        planned = next_of(plan)
        blocks.check_invariants()
        for finished in run(scheduler, plan):
            done[finished.request_id] = finished.num_generated
        if next_id > 40 and not scheduler.has_work:
            break
    assert done == expected
    assert blocks.num_used_blocks == 0
    assert ahead_steps >= 1


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_on_a_tiny_cache_with_cancels_completes_and_frees_every_block(seed):
    rng = random.Random(seed)
    scheduler, blocks = make(num_blocks=12, block_size=4, max_batch_prefill_tokens=10,
                             max_waiting_tokens=3, admit_ahead=True)
    expected: dict[int, int] = {}
    done: dict[int, int] = {}
    cancelled: set[int] = set()
    next_id = 1
    for step in range(3000):
        if next_id <= 40 and rng.random() < 0.3:
            s = seq(next_id, rng.randint(1, 30), rng.randint(1, 14), first=rng.choice([None, seed]))
            scheduler.add(s)
            expected[next_id] = s.max_new_tokens
            next_id += 1
        if rng.random() < 0.05 and expected:
            victim = rng.choice(sorted(expected))
            if victim not in done and scheduler.remove(victim) is not None:
                cancelled.add(victim)
        plan = scheduler.schedule(float(step))
        assert not plan.failed
        blocks.check_invariants()
        assert blocks.num_used_blocks <= 11
        for finished in run(scheduler, plan):
            done[finished.request_id] = finished.num_generated
        if next_id > 40 and not scheduler.has_work:
            break
    assert not scheduler.has_work and blocks.num_used_blocks == 0
    assert done == {rid: n for rid, n in expected.items() if rid not in cancelled}


def test_nothing_is_planned_ahead_while_a_waiting_request_would_wait_for_a_prefix():
    """Planned ahead, a request sharing a prompt in flight would start without its cached
    prefix a step later; planned after the step, it starts from the committed prefix."""
    scheduler, blocks = make(max_batch_prefill_tokens=16, admit_ahead=True)
    scheduler.add(seq(1, 14, first=0))
    scheduler.add(seq(2, 14, first=0))           # the same prompt: it waits for request 1's
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 14)] and next_of(plan) == []
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, 12, 2)]       # three whole blocks from the cache
