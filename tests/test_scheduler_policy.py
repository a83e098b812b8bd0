"""The batching policy on its own: budgets, chunking, growth, preemption, with the real
BlockManager and a simulated shard outcome (no I/O)."""

from __future__ import annotations

import random

import pytest

from shardgen.router.block_manager import BlockManager
from shardgen.router.scheduler import (BatchMismatchError, Scheduler, SchedulerConfig, Sequence,
                                       SeqStatus, StepPlan, slot_range)

TOKEN = 7


def make(num_blocks: int = 64, block_size: int = 4, **config: object
         ) -> tuple[Scheduler, BlockManager]:
    blocks = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**config), blocks), blocks


def seq(request_id: int, prompt_len: int, max_new_tokens: int = 4, *, first: int | None = None,
        **fields: object) -> Sequence:
    """A request whose prompt differs from the others' unless they share `first`."""
    start = request_id * 101 if first is None else first
    prompt = [(start + i) % 500 + 3 for i in range(prompt_len)]
    return Sequence(request_id=request_id, token_ids=prompt, prompt_len=prompt_len,
                    max_new_tokens=max_new_tokens, **fields)


def run(scheduler: Scheduler, plan: StepPlan) -> list[Sequence]:
    """Play the shard: one token per sampled request, LENGTH stop at max_new_tokens."""
    block_size = scheduler._block_size
    for s in plan.decoding:
        assert len(s.blocks) * block_size >= len(s.token_ids), "no block for the next token"
    for chunk in plan.chunks:
        assert len(chunk.seq.blocks) * block_size >= len(chunk.seq.token_ids)
    sampled = plan.decoding + [chunk.seq for chunk in plan.chunks if chunk.is_last]
    finished = {s.request_id for s in sampled if s.num_generated + 1 >= s.max_new_tokens}
    batch = [s.request_id for s in sampled if s.request_id not in finished]
    return scheduler.complete(plan, {s.request_id: [TOKEN] for s in sampled}, finished, batch)


def drain(scheduler: Scheduler) -> None:
    """Play steps until every request has finished."""
    while scheduler.has_work:
        run(scheduler, scheduler.schedule(0.0))


def chunks_of(plan: StepPlan) -> list[tuple[int, int, int]]:
    return [(c.seq.request_id, c.start, c.length) for c in plan.chunks]


def test_prompts_share_the_prefill_budget_and_the_last_one_is_chunked():
    scheduler, _ = make(max_batch_prefill_tokens=25)
    for request_id in (1, 2, 3):
        scheduler.add(seq(request_id, 10))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 10), (2, 0, 10), (3, 0, 5)]
    assert not plan.decoding
    run(scheduler, plan)
    assert scheduler.running_ids == [1, 2]

    plan = scheduler.schedule(0.0)
    # The rest of request 3 rides with one decode token of requests 1 and 2.
    assert chunks_of(plan) == [(3, 5, 5)]
    assert [s.request_id for s in plan.decoding] == [1, 2]
    run(scheduler, plan)
    assert scheduler.running_ids == [1, 2, 3]


def test_a_long_prompt_is_computed_one_chunk_per_step_while_others_decode():
    scheduler, _ = make(max_batch_prefill_tokens=16)
    scheduler.add(seq(1, 3, max_new_tokens=10))
    run(scheduler, scheduler.schedule(0.0))
    scheduler.add(seq(2, 50))
    seen = []
    for _ in range(4):
        plan = scheduler.schedule(0.0)
        assert [s.request_id for s in plan.decoding] == [1]
        seen.extend(chunks_of(plan))
        run(scheduler, plan)
    assert seen == [(2, 0, 16), (2, 16, 16), (2, 32, 16), (2, 48, 2)]
    assert scheduler.running_ids == [1, 2]


def test_running_requests_get_a_new_block_one_position_ahead():
    """Blocks cover the token a request computes next and the one after it (the shards may
    run that step ahead); the last token, which is never computed, gets none."""
    scheduler, _ = make(block_size=4)
    scheduler.add(seq(1, 6, max_new_tokens=8))
    run(scheduler, scheduler.schedule(0.0))          # positions 0-5 in 2 blocks; token 6 sampled
    plan = scheduler.schedule(0.0)                    # computes position 6; position 7 is in block 2 too
    assert plan.extensions == {}
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)                    # computes position 7; position 8 needs a third block
    (request_id, new_blocks), = plan.extensions.items()
    assert request_id == 1 and len(new_blocks) == 1
    assert plan.decoding[0].blocks[-1] == new_blocks[0]
    run(scheduler, plan)
    assert scheduler.schedule(0.0).extensions == {}   # computes position 8: its block is there

    scheduler, _ = make(block_size=4)
    scheduler.add(seq(2, 4, max_new_tokens=1))        # its only token is sampled, never computed
    plan = scheduler.schedule(0.0)
    assert len(plan.chunks[0].seq.blocks) == 1


def test_new_requests_wait_for_the_served_ratio_or_max_waiting_tokens():
    scheduler, _ = make(waiting_served_ratio=0.5, max_waiting_tokens=3)
    for request_id in range(1, 5):
        scheduler.add(seq(request_id, 4, max_new_tokens=50))
    run(scheduler, scheduler.schedule(0.0))
    assert len(scheduler.running_ids) == 4
    scheduler.add(seq(5, 4))
    # 4 running * 0.5 = 2 new requests wanted at once; one waits for max_waiting_tokens steps.
    for _ in range(2):
        plan = scheduler.schedule(0.0)
        assert not plan.chunks
        run(scheduler, plan)
    assert chunks_of(scheduler.schedule(0.0)) == [(5, 0, 4)]


def test_enough_waiting_requests_join_at_once():
    scheduler, _ = make(waiting_served_ratio=0.5, max_waiting_tokens=100)
    for request_id in range(1, 5):
        scheduler.add(seq(request_id, 4, max_new_tokens=50))
    run(scheduler, scheduler.schedule(0.0))
    scheduler.add(seq(5, 4))
    scheduler.add(seq(6, 4))
    assert chunks_of(scheduler.schedule(0.0)) == [(5, 0, 4), (6, 0, 4)]


def test_max_batch_size_counts_running_and_new_requests():
    scheduler, _ = make(max_batch_size=3, waiting_served_ratio=0.0)
    for request_id in range(1, 6):
        scheduler.add(seq(request_id, 4, max_new_tokens=50))
    plan = scheduler.schedule(0.0)
    assert [c.seq.request_id for c in plan.chunks] == [1, 2, 3]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert not plan.chunks and len(plan.decoding) == 3


def test_max_batch_total_tokens_reserves_prompt_plus_max_new_tokens():
    scheduler, _ = make(max_batch_total_tokens=30, waiting_served_ratio=0.0, scheduling_policy="fcfs")
    scheduler.add(seq(1, 10, max_new_tokens=10))
    scheduler.add(seq(2, 5, max_new_tokens=5))
    scheduler.add(seq(3, 5, max_new_tokens=5))
    plan = scheduler.schedule(0.0)
    assert [c.seq.request_id for c in plan.chunks] == [1, 2]
    with pytest.raises(ValueError, match=r"max_new_tokens \(25\) exceeds max_batch_total_tokens \(30\)"):
        scheduler.check_fits(10, 25)


def test_a_prompt_larger_than_the_whole_cache_is_refused_with_the_numbers():
    scheduler, _ = make(num_blocks=5, block_size=4)   # 4 usable blocks: 16 tokens
    scheduler.check_fits(16, 100)
    with pytest.raises(ValueError, match="17 tokens and needs 5 KV blocks .* has 4 blocks"):
        scheduler.check_fits(17, 1)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        scheduler.check_fits(3, 0)


def test_preemption_takes_the_newest_requests_back_to_the_front_of_the_queue():
    # 4 usable blocks of 4 tokens; four prompts of 3 tokens fill them, each with the slot of
    # the token it samples.
    scheduler, blocks = make(num_blocks=5, block_size=4, scheduling_policy="fcfs")
    scheduler.add(seq(1, 3, max_new_tokens=4))
    for request_id in (2, 3, 4):
        scheduler.add(seq(request_id, 3, max_new_tokens=6))
    scheduler.add(seq(5, 2))
    run(scheduler, scheduler.schedule(0.0))
    assert scheduler.running_ids == [1, 2, 3, 4] and blocks.num_free_blocks == 0

    plan = scheduler.schedule(0.0)       # position 3 of each is in its block; none is free for
    assert not plan.preempted and plan.extensions == {}   # position 4, and that is no reason to preempt
    run(scheduler, plan)

    plan = scheduler.schedule(0.0)       # position 4 of each needs a block: none is free
    assert [s.request_id for s in plan.preempted] == [4, 3]
    assert [s.request_id for s in plan.decoding] == [1, 2]
    assert plan.batch_changed and not plan.chunks   # no admission in a preempting step
    assert [s.request_id for s in scheduler._waiting] == [3, 4, 5]
    preempted = scheduler.get(4)
    assert preempted.status is SeqStatus.WAITING and preempted.blocks == []
    assert preempted.token_ids[3:] == [TOKEN, TOKEN] and preempted.num_generated == 2
    blocks.check_invariants()
    run(scheduler, plan)

    plan = scheduler.schedule(0.0)
    assert not plan.chunks and not plan.batch_changed
    assert [s.num_generated for s in run(scheduler, plan)] == [4]   # request 1 is done

    plan = scheduler.schedule(0.0)
    # Request 3 is recomputed from its prompt and its two tokens: 5 tokens, 2 blocks.
    assert chunks_of(plan) == [(3, 0, 5)]


def test_a_request_that_alone_cannot_grow_fails_with_the_numbers():
    scheduler, blocks = make(num_blocks=3, block_size=4)   # 8 tokens of KV
    scheduler.add(seq(1, 7, max_new_tokens=5))
    run(scheduler, scheduler.schedule(0.0))               # 7 computed, token at position 7
    run(scheduler, scheduler.schedule(0.0))               # position 7 fits block 2
    plan = scheduler.schedule(0.0)                        # position 8 needs a third block
    (failed, reason), = plan.failed
    assert failed.request_id == 1 and plan.is_empty and plan.batch_changed
    assert reason == ("request 1 needs 3 KV blocks for 9 tokens; the whole KV cache has "
                      "2 blocks of 4 tokens")
    assert blocks.num_used_blocks == 0 and not scheduler.has_work


def test_a_cached_prefix_is_not_computed_again_unless_prompt_logprobs_are_wanted():
    scheduler, blocks = make(block_size=4, scheduling_policy="fcfs")
    scheduler.add(seq(1, 10, max_new_tokens=1, first=0))
    run(scheduler, scheduler.schedule(0.0))               # finishes; its 2 full blocks stay cached
    scheduler.add(seq(2, 10, first=0))
    scheduler.add(seq(3, 10, first=0, prefill_logprobs=True))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, 8, 2), (3, 0, 10)]
    # Request 3 writes its whole prompt into blocks of its own, not over those 2 reads.
    assert not set(plan.chunks[0].seq.blocks) & set(plan.chunks[1].seq.blocks)
    run(scheduler, plan)
    # Its twins of indexed blocks are not indexed: they are freed with it, and the index
    # keeps the 3 full blocks of request 2 (the same tokens as request 3's).
    drain(scheduler)
    assert blocks.num_used_blocks == 0 and blocks.num_cached_blocks == 3
    blocks.check_invariants()


def test_removed_requests_free_their_blocks_and_mark_the_batch_changed():
    scheduler, blocks = make(max_batch_prefill_tokens=6, scheduling_policy="fcfs")
    scheduler.add(seq(1, 4, max_new_tokens=20))
    scheduler.add(seq(2, 12, max_new_tokens=20))
    scheduler.add(seq(3, 4))
    run(scheduler, scheduler.schedule(0.0))               # 1 running, 2 half prefilled, 3 waiting
    assert scheduler.get(2).status is SeqStatus.PREFILLING
    assert scheduler.remove(3).status is SeqStatus.WAITING
    scheduler.remove(2)
    assert not scheduler.schedule(0.0).batch_changed
    scheduler.remove(1)
    plan = scheduler.schedule(0.0)
    assert plan.batch_changed and plan.is_empty
    assert scheduler.remove(1) is None
    assert blocks.num_used_blocks == 0
    blocks.check_invariants()


def test_requests_past_their_deadline_fail_wherever_they_are():
    scheduler, blocks = make()
    scheduler.add(seq(1, 4, max_new_tokens=20, deadline=10.0))
    scheduler.add(seq(2, 4, max_new_tokens=20))
    run(scheduler, scheduler.schedule(0.0))
    scheduler.add(seq(3, 4, deadline=10.0))
    plan = scheduler.schedule(10.0)
    assert sorted(s.request_id for s, _ in plan.failed) == [1, 3]
    assert "request 1 passed its deadline after 1 generated tokens" in [r for _, r in plan.failed]
    assert [s.request_id for s in plan.decoding] == [2] and plan.batch_changed
    blocks.check_invariants()


def test_an_unexpected_outcome_is_refused_and_changes_nothing():
    scheduler, _ = make()
    scheduler.add(seq(1, 4, max_new_tokens=5))
    scheduler.add(seq(2, 4, max_new_tokens=5))
    plan = scheduler.schedule(0.0)
    with pytest.raises(BatchMismatchError, match=r"batch holds \[1\], expected \[1, 2\]"):
        scheduler.complete(plan, {1: [TOKEN], 2: [TOKEN]}, set(), [1])
    with pytest.raises(BatchMismatchError, match=r"sampled tokens for \[1\]"):
        scheduler.complete(plan, {1: [TOKEN]}, set(), [1, 2])
    assert scheduler.get(1).num_computed == 0 and len(scheduler.get(1).token_ids) == 4
    failed, requeued = scheduler.abort_step(plan, isolate=False)
    assert sorted(s.request_id for s in failed) == [1, 2] and requeued == []
    assert not scheduler.has_work


def test_a_failed_step_of_several_requests_tries_each_alone_and_blames_one():
    scheduler, blocks = make(max_batch_prefill_tokens=64)
    scheduler.add(seq(1, 5, max_new_tokens=8))
    run(scheduler, scheduler.schedule(0.0))
    run(scheduler, scheduler.schedule(0.0))        # request 1 has 2 tokens
    scheduler.add(seq(2, 6))
    scheduler.add(seq(3, 7))
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, 0, 6), (3, 0, 7)] and plan.decoding
    failed, requeued = scheduler.abort_step(plan, isolate=True)
    # Nobody is blamed yet: all three go back, oldest first; the two prompts, suspects
    # (request 1 came through the step before), are each to be tried alone.
    assert failed == [] and [s.request_id for s in requeued] == [1, 2, 3]
    assert [(s.on_trial, s.shared_failures) for s in requeued] == [(False, 0), (True, 1),
                                                                   (True, 1)]
    assert blocks.num_used_blocks == 0 and scheduler.num_waiting == 3
    scheduler.add(seq(4, 3))

    # Request 1 is recomputed (prompt and generated tokens); no prompt joins a trial's ...
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 4, 3)] and not plan.decoding   # 4 from the prefix cache
    run(scheduler, plan)
    # ... then request 2 beside request 1's decode, and its trial fails: it alone is blamed.
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(2, 0, 6)] and [s.request_id for s in plan.decoding] == [1]
    failed, requeued = scheduler.abort_step(plan, isolate=True)
    assert [s.request_id for s in failed] == [2] and [s.request_id for s in requeued] == [1]
    assert scheduler.get(2) is None and not scheduler.get(1).on_trial
    # Request 3, still on trial, waits behind request 1's recomputation; request 4 behind it.
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 4, 4)]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(3, 0, 7)]
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(4, 0, 3)]
    assert [s.request_id for s in plan.decoding] == [1, 3]
    run(scheduler, plan)
    drain(scheduler)
    assert blocks.num_used_blocks == 0
    blocks.check_invariants()


def test_a_request_fails_at_the_second_failed_step_it_shares():
    scheduler, _ = make()
    scheduler.add(seq(1, 4, max_new_tokens=8))
    scheduler.add(seq(2, 4, max_new_tokens=8))
    failed, _ = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
    assert failed == []
    run(scheduler, scheduler.schedule(0.0))        # each passes its trial
    run(scheduler, scheduler.schedule(0.0))
    assert scheduler.running_ids == [1, 2]
    # A fault that only shows in their shared decode: no endless retry.
    failed, requeued = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
    assert [s.request_id for s in failed] == [1, 2] and requeued == []
    assert not scheduler.has_work


def test_a_trial_that_finds_the_fault_clears_the_others_of_its_step():
    """Found on the GPU soak with faults (benchmark/NOTES.md): the innocent suspects of a
    failed step passed their trials and ran on with their strike; when the trial of the
    one at fault failed they were recomputed as prompts, and the next bad prompt to join
    them failed all of them. Once a trial finds the fault, its step is explained."""
    scheduler, _ = make()
    for request_id in (2, 3, 1):    # request 1 is the bad one
        scheduler.add(seq(request_id, 4, max_new_tokens=20))
    failed, _ = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
    assert failed == []
    run(scheduler, scheduler.schedule(0.0))         # 2's trial passes ...
    run(scheduler, scheduler.schedule(0.0))         # ... and 3's
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 4)]
    failed, requeued = scheduler.abort_step(plan, isolate=True)
    assert [s.request_id for s in failed] == [1] and [s.request_id for s in requeued] == [2, 3]
    assert [(s.on_trial, s.shared_failures) for s in requeued] == [(False, 0), (False, 0)]
    # Another bad prompt joins their recomputation: nobody is blamed before a trial.
    scheduler.add(seq(4, 4))
    plan = scheduler.schedule(0.0)
    assert [c.seq.request_id for c in plan.chunks] == [2, 3, 4]
    failed, _ = scheduler.abort_step(plan, isolate=True)
    assert failed == []


def test_the_others_of_an_explained_step_still_get_their_trial():
    """A suspect not yet tried when another's trial finds the fault loses its strike but
    keeps its trial: a step can hold two bad prompts."""
    scheduler, _ = make()
    scheduler.add(seq(1, 4))
    scheduler.add(seq(2, 4, max_new_tokens=20))
    scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
    failed, _ = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)   # 1's trial
    assert [s.request_id for s in failed] == [1]
    assert (scheduler.get(2).on_trial, scheduler.get(2).shared_failures) == (True, 0)


def test_a_running_request_outlives_any_number_of_bad_prompts_that_join_it():
    scheduler, _ = make()
    scheduler.add(seq(1, 4, max_new_tokens=50))
    run(scheduler, scheduler.schedule(0.0))
    for bad in (2, 3, 4):
        scheduler.add(seq(bad, 5))
        failed, _ = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
        assert failed == []                         # the prompt goes on trial ...
        run(scheduler, scheduler.schedule(0.0))     # ... request 1 is recomputed ...
        failed, _ = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
        assert [s.request_id for s in failed] == [bad]   # ... and the trial fails
        run(scheduler, scheduler.schedule(0.0))
    assert scheduler.running_ids == [1] and scheduler.get(1).shared_failures == 0


def test_a_failed_step_of_one_request_fails_it():
    scheduler, _ = make()
    scheduler.add(seq(1, 4))
    scheduler.add(seq(2, 4))
    failed, requeued = scheduler.abort_step(scheduler.schedule(0.0), isolate=True)
    assert failed == [] and len(requeued) == 2
    plan = scheduler.schedule(0.0)
    assert chunks_of(plan) == [(1, 0, 4)]
    failed, requeued = scheduler.abort_step(plan, isolate=True)
    assert [s.request_id for s in failed] == [1] and requeued == []
    assert chunks_of(scheduler.schedule(0.0)) == [(2, 0, 4)]


def test_admission_does_not_retry_a_request_until_blocks_come_free():
    scheduler, blocks = make(num_blocks=5, block_size=4)
    scheduler.add(seq(1, 12, max_new_tokens=3))
    run(scheduler, scheduler.schedule(0.0))
    scheduler.add(seq(2, 8))
    calls = []
    allocate = blocks.allocate
    blocks.allocate = lambda *args, **kw: calls.append(args[0]) or allocate(*args, **kw)
    run(scheduler, scheduler.schedule(0.0))   # request 2 does not fit beside request 1
    run(scheduler, scheduler.schedule(0.0))   # request 1 finishes here
    assert calls.count(2) == 2   # one try: with the slot of its first token, then without
    assert chunks_of(scheduler.schedule(0.0)) == [(2, 0, 8)]


def test_slot_range_maps_positions_through_the_block_table():
    assert slot_range([5, 2, 9], 4, 0, 3) == [20, 21, 22]
    assert slot_range([5, 2, 9], 4, 3, 10) == [23, 8, 9, 10, 11, 36, 37]
    assert slot_range([5], 4, 2, 2) == []
    with pytest.raises(ValueError, match="positions up to 9 need 3 blocks, the table has 2"):
        slot_range([5, 2], 4, 0, 9)


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_on_a_tiny_cache_always_completes_and_frees_every_block(seed):
    rng = random.Random(seed)
    scheduler, blocks = make(num_blocks=12, block_size=4, max_batch_prefill_tokens=10,
                             waiting_served_ratio=rng.choice([0.0, 0.3, 1.0]), max_waiting_tokens=3)
    expected: dict[int, int] = {}
    done: dict[int, int] = {}
    failed: set[int] = set()
    preemptions = 0
    next_id = 1
    for step in range(3000):
        if next_id <= 40 and rng.random() < 0.3:
            s = seq(next_id, rng.randint(1, 30), rng.randint(1, 14), first=rng.choice([None, seed]))
            scheduler.check_fits(s.prompt_len, s.max_new_tokens)
            scheduler.add(s)
            expected[next_id] = s.max_new_tokens
            next_id += 1
        plan = scheduler.schedule(float(step))
        failed.update(s.request_id for s, _ in plan.failed)
        preemptions += len(plan.preempted)
        blocks.check_invariants()
        assert blocks.num_used_blocks <= 11
        for finished in run(scheduler, plan):
            done[finished.request_id] = finished.num_generated
        if next_id > 40 and not scheduler.has_work:
            break
    assert not scheduler.has_work
    assert blocks.num_used_blocks == 0
    # Prompts up to 30 and max_new_tokens up to 14 need at most 11 blocks: every request
    # fits alone, so every one finishes, with exactly its max_new_tokens tokens.
    assert not failed
    assert done == expected
    assert preemptions > 0, "the cache was meant to be too small for the traffic"


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_poisoned_requests_loses_none_and_fails_the_poisoned(seed):
    """A poisoned request fails every step that computes its prompt (a bad input); the
    steps fail with isolation, as the engine does for an error the shards answer with."""
    rng = random.Random(seed)
    scheduler, blocks = make(num_blocks=24, block_size=4, max_batch_prefill_tokens=24,
                             max_batch_size=rng.choice([None, 4]))
    poisoned = set(rng.sample(range(1, 31), 1 + seed % 3))
    done: dict[int, int] = {}
    failed: dict[int, Sequence] = {}
    max_new: dict[int, int] = {}
    next_id = 1
    for step in range(3000):
        # Bursts, some sharing a new prefix: their requests wait for one another's blocks
        # (and for a poisoned one's, which never come).
        first = rng.choice([None, next_id * 101])
        while next_id <= 30 and rng.random() < 0.4:
            s = seq(next_id, rng.randint(1, 20), rng.randint(1, 10), first=first)
            scheduler.add(s)
            max_new[next_id] = s.max_new_tokens
            next_id += 1
        plan = scheduler.schedule(float(step))
        assert not plan.failed
        if any(chunk.seq.request_id in poisoned for chunk in plan.chunks):
            assert sum(chunk.seq.on_trial for chunk in plan.chunks) <= 1
            blamed, _ = scheduler.abort_step(plan, isolate=True)
            failed.update((s.request_id, s) for s in blamed)
        else:
            for finished in run(scheduler, plan):
                done[finished.request_id] = finished.num_generated
        blocks.check_invariants()
        if next_id > 30 and not scheduler.has_work:
            break
    assert not scheduler.has_work and blocks.num_used_blocks == 0
    assert set(done) | set(failed) == set(max_new) and not set(done) & set(failed)
    assert poisoned <= set(failed)
    assert all(done[request_id] == max_new[request_id] for request_id in done)
    # An innocent request fails only after two failed steps that could not tell it apart.
    assert all(failed[request_id].shared_failures >= 2 for request_id in set(failed) - poisoned)
    if len(poisoned) == 1:
        assert set(failed) == poisoned


def test_the_next_step_is_called_a_plain_decode_only_when_no_prompt_would_start():
    scheduler, _ = make(max_batch_prefill_tokens=8, waiting_served_ratio=0.5, max_waiting_tokens=3)
    scheduler.add(seq(1, 12, max_new_tokens=20))
    plan = scheduler.schedule(0.0)                 # the first chunk of 8: another follows
    assert not scheduler.decodes_only_next(plan)
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)                 # its last chunk: nothing else waits
    assert scheduler.decodes_only_next(plan)
    run(scheduler, plan)
    scheduler.add(seq(2, 4, max_new_tokens=20))
    scheduler.add(seq(3, 4, max_new_tokens=20))
    plan = scheduler.schedule(0.0)                 # 1 running wants 1 new: they start now
    assert chunks_of(plan) == [(2, 0, 4), (3, 0, 4)] and scheduler.decodes_only_next(plan)
    run(scheduler, plan)
    scheduler.add(seq(4, 4, max_new_tokens=20))
    plan = scheduler.schedule(0.0)                 # 3 running want 1 new (ratio 0.5): it starts
    assert chunks_of(plan) == [(4, 0, 4)]
    run(scheduler, plan)
    scheduler.add(seq(5, 4, max_new_tokens=20))    # 4 running want 2 new: one waits...
    plan = scheduler.schedule(0.0)
    assert not plan.chunks and scheduler.decodes_only_next(plan)
    run(scheduler, plan)
    plan = scheduler.schedule(0.0)
    assert not plan.chunks and not scheduler.decodes_only_next(plan)   # ...until max_waiting_tokens
    run(scheduler, plan)
    assert chunks_of(scheduler.schedule(0.0)) == [(5, 0, 4)]
