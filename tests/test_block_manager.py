"""Block manager: exact block ids, reference counts, sharing, eviction order, events."""

from __future__ import annotations

import pytest

from shardgen.router.block_manager import Allocation, BlockManager
from shardgen.router.kv_events import KVEvent
from shardgen.router.radix import block_hash

BS = 4  # block size of every manager here


def chain_hashes(token_ids: list[int], num_blocks: int) -> list[str]:
    """Hashes of the first num_blocks full blocks of token_ids, by the hash-chain rule."""
    hashes: list[str] = []
    for i in range(num_blocks):
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, token_ids[i * BS : (i + 1) * BS]))
    return hashes


def make(num_blocks: int = 8, caching: bool = True) -> tuple[BlockManager, list[KVEvent]]:
    events: list[KVEvent] = []
    manager = BlockManager(
        num_blocks, BS, enable_prefix_caching=caching, event_sink=events.append
    )
    return manager, events


def run_and_commit(manager: BlockManager, request_id: int, tokens: list[int]) -> Allocation:
    """Allocate a whole prompt and commit it as computed."""
    allocation = manager.allocate(request_id, tokens, len(tokens))
    assert allocation is not None
    manager.commit(request_id, tokens, len(tokens))
    manager.check_invariants()
    return allocation


def test_fresh_manager_hands_out_blocks_in_order_never_block_0() -> None:
    manager, _ = make(num_blocks=6)
    counts = (manager.num_free_blocks, manager.num_used_blocks, manager.num_cached_blocks)
    assert counts == (5, 0, 0)
    first = manager.allocate(1, list(range(9)), 9)
    assert first == Allocation(blocks=[1, 2, 3], new_blocks=[1, 2, 3], num_cached_tokens=0)
    second = manager.allocate(2, list(range(8)), 8)
    assert second == Allocation(blocks=[4, 5], new_blocks=[4, 5], num_cached_tokens=0)
    assert manager.num_free_blocks == 0 and manager.num_used_blocks == 5
    assert manager.allocate(3, [1], 1) is None  # only block 0 is left, and it is reserved
    assert [manager.ref_count(b) for b in range(6)] == [0, 1, 1, 1, 1, 1]
    manager.check_invariants()


def test_freed_blocks_are_reused_oldest_freed_first() -> None:
    manager, _ = make(num_blocks=8, caching=False)
    manager.allocate(1, list(range(12)), 12)  # 1 2 3
    manager.allocate(2, list(range(8)), 8)  # 4 5
    manager.free(1)  # free list is now 6 7 1 2 3
    allocation = manager.allocate(3, list(range(16)), 16)
    assert allocation is not None and allocation.blocks == [6, 7, 1, 2]
    manager.check_invariants()


def test_later_calls_only_grow_the_table() -> None:
    manager, _ = make()
    tokens = list(range(20))
    manager.allocate(1, tokens, 4)
    manager.commit(1, tokens, 4)
    manager.allocate(2, tokens, 5)  # reuses block 1, gets block 2
    grown = manager.allocate(2, tokens, 13)
    assert grown == Allocation(blocks=[1, 2, 3, 4], new_blocks=[3, 4], num_cached_tokens=4)
    same = manager.allocate(2, tokens, 10)  # already covered: nothing appended
    assert same == Allocation(blocks=[1, 2, 3, 4], new_blocks=[], num_cached_tokens=4)
    manager.check_invariants()


def test_lookup_never_covers_the_last_prompt_token() -> None:
    manager, _ = make()
    tokens = list(range(12))
    run_and_commit(manager, 1, tokens)
    assert manager.lookup(tokens) == 8  # 12 cached, but the 12th token must be computed
    assert manager.lookup(tokens + [99]) == 12
    assert manager.lookup(tokens[:9]) == 8
    assert manager.lookup(tokens[:8]) == 4
    assert manager.lookup(tokens[:1]) == 0 and manager.lookup([]) == 0
    assert manager.lookup([0, 1, 2, 7, 4, 5]) == 0  # differs inside the first block
    assert manager.lookup([0, 1, 2, 3, 4, 5, 6, 0, 8]) == 4  # differs in the second


def test_concurrent_requests_share_committed_blocks() -> None:
    manager, _ = make(num_blocks=10)
    prompt_a = list(range(10))
    run_and_commit(manager, 1, prompt_a)  # blocks 1 2 3; 1 and 2 full and indexed
    prompt_b = prompt_a[:8] + [50, 51, 52]
    shared = manager.allocate(2, prompt_b, len(prompt_b))
    assert shared == Allocation(blocks=[1, 2, 4], new_blocks=[1, 2, 4], num_cached_tokens=8)
    assert [manager.ref_count(b) for b in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert manager.prefix_hit_tokens_total == 8
    manager.free(1)
    assert [manager.ref_count(b) for b in (1, 2, 3)] == [1, 1, 0]
    assert manager.num_cached_blocks == 0  # 1 and 2 are still used by request 2
    manager.free(2)
    assert manager.num_cached_blocks == 2 and manager.num_used_blocks == 0
    manager.check_invariants()


def test_without_reuse_a_cached_prefix_gets_blocks_of_its_own_and_stays_indexed() -> None:
    manager, events = make(num_blocks=10)
    prompt = list(range(10))
    run_and_commit(manager, 1, prompt)  # blocks 1 2 3; 1 and 2 full and indexed
    stored = len(events)
    own = manager.allocate(2, prompt, len(prompt), reuse=False)
    assert own == Allocation(blocks=[4, 5, 6], new_blocks=[4, 5, 6], num_cached_tokens=0)
    assert manager.prefix_hit_tokens_total == 0
    manager.commit(2, prompt, len(prompt))
    manager.check_invariants()
    # Its full blocks are twins of indexed ones: nothing new is indexed or announced, and
    # they go back to the free list with the request.
    assert len(events) == stored
    manager.free(1)
    manager.free(2)
    assert manager.num_used_blocks == 0 and manager.num_cached_blocks == 2
    assert manager.lookup(prompt) == 8
    manager.check_invariants()


def test_reuse_takes_evictable_blocks_out_of_the_evictable_set() -> None:
    manager, _ = make(num_blocks=7)  # 6 usable
    tokens = list(range(9))
    run_and_commit(manager, 1, tokens)  # blocks 1 2 3
    manager.allocate(2, [90, 91, 92, 93], 4)  # block 4
    manager.free(1)  # 1 2 cached, 3 free; free list 5 6 3
    assert (manager.num_free_blocks, manager.num_cached_blocks) == (5, 2)
    longer = tokens[:8] + list(range(100, 120))
    # Reusing 1 and 2 leaves 3 allocatable: 4 more blocks do not fit, 3 do.
    assert manager.allocate(3, longer, 24) is None
    allocation = manager.allocate(3, longer, 20)
    assert allocation is not None and allocation.blocks == [1, 2, 5, 6, 3]
    assert manager.evictions_total == 0 and manager.num_free_blocks == 0
    manager.check_invariants()


def test_failed_allocate_changes_nothing() -> None:
    """A manager that saw a failing allocate behaves exactly like one that did not."""
    managers = [make(num_blocks=6) for _ in range(2)]
    prompt = list(range(9))
    for manager, _ in managers:
        run_and_commit(manager, 1, prompt)  # blocks 1 2 3
        manager.free(1)  # 1 2 cached, 3 free
        manager.allocate(2, [7] * 8, 8)  # 4 5
    touched, events = managers[0]
    before = events[:]
    # A first call that would reuse the cached prefix, and a grow, both too large.
    assert touched.allocate(3, prompt + [1] * 20, 29) is None
    assert touched.allocate(2, [7] * 40, 40) is None
    assert events == before and touched.prefix_hit_tokens_total == 0
    assert not touched.has_request(3)
    for manager, _ in managers:
        manager.check_invariants()
    ref_counts = [[m.ref_count(b) for b in range(6)] for m, _ in managers]
    assert ref_counts[0] == ref_counts[1]
    results = [m.allocate(4, prompt + [1, 2, 3], 12) for m, _ in managers]
    assert results[0] == results[1] == Allocation([1, 2, 3], [1, 2, 3], 8)
    assert [m.allocate(5, [9] * 8, 8) for m, _ in managers] == [None, None]
    assert [m.allocate(2, [7] * 8, 12) for m, _ in managers] == [None, None]
    kinds = [[(e.kind, e.block_hashes) for e in log] for _, log in managers]
    assert kinds[0] == kinds[1]


def test_commit_is_idempotent() -> None:
    manager, events = make()
    tokens = list(range(10))
    manager.allocate(1, tokens, 10)
    manager.commit(1, tokens, 6)  # one full block
    manager.commit(1, tokens, 6)
    manager.commit(1, tokens, 4)
    assert [e.block_hashes for e in events] == [tuple(chain_hashes(tokens, 1))]
    manager.commit(1, tokens, 10)
    manager.commit(1, tokens, 10)
    hashes = chain_hashes(tokens, 2)
    assert [e.block_hashes for e in events] == [(hashes[0],), (hashes[1],)]
    assert events[1].parent_hash == hashes[0]
    assert [manager.ref_count(b) for b in (1, 2, 3)] == [1, 1, 1]
    manager.check_invariants()


def test_stored_events_carry_chain_hashes_parent_and_token_count() -> None:
    manager, events = make(num_blocks=10)
    prompt = list(range(13))
    run_and_commit(manager, 1, prompt)
    hashes = chain_hashes(prompt, 3)
    assert len(events) == 1
    event = events[0]
    assert (event.kind, event.block_hashes, event.parent_hash, event.token_count) == (
        "stored",
        tuple(hashes),
        None,
        12,
    )
    assert isinstance(event.timestamp, float) and event.timestamp > 0
    other = prompt[:8] + [40, 41, 42, 43, 44]
    run_and_commit(manager, 2, other)  # reuses two blocks, stores one below them
    assert events[1].block_hashes == (block_hash(hashes[1], [40, 41, 42, 43]),)
    assert events[1].parent_hash == hashes[1] and events[1].token_count == 4


def test_eviction_is_lru_and_takes_the_tail_of_a_chain_first() -> None:
    manager, events = make(num_blocks=7)  # 6 usable
    first, second = [1] * 8 + [0], [2] * 8 + [0]
    run_and_commit(manager, 1, first)  # 1 2 (indexed) 3
    run_and_commit(manager, 2, second)  # 4 5 (indexed) 6
    manager.free(1)
    manager.free(2)  # free list: 3 6; cached: 1 2 (older), 4 5
    allocation = manager.allocate(3, [9] * 12, 12)
    assert allocation is not None and allocation.blocks == [3, 6, 2]
    assert events[-1].kind == "removed"
    assert events[-1].block_hashes == (chain_hashes(first, 2)[1],)
    allocation = manager.allocate(3, [9] * 12, 24)
    assert allocation is not None and allocation.new_blocks == [1, 5, 4]
    second_hashes = chain_hashes(second, 2)
    assert events[-1].block_hashes == (chain_hashes(first, 1)[0], *reversed(second_hashes))
    assert events[-1].token_count == 12 and manager.evictions_total == 4
    assert manager.lookup(first) == 0 and manager.lookup(second) == 0
    manager.check_invariants()


def test_recently_reused_blocks_are_evicted_last() -> None:
    manager, _ = make(num_blocks=5)  # 4 usable
    old, new = [1] * 4 + [0], [2] * 4 + [0]
    run_and_commit(manager, 1, old)  # 1 (indexed) 2
    run_and_commit(manager, 2, new)  # 3 (indexed) 4
    manager.free(1)
    manager.free(2)
    run_and_commit(manager, 3, old)  # reuses 1, takes 2 again
    manager.free(3)  # block 1 was released after block 3
    allocation = manager.allocate(4, [9] * 12, 12)
    assert allocation is not None and allocation.blocks == [4, 2, 3]
    assert manager.lookup(old) == 4 and manager.lookup(new) == 0


def test_eviction_takes_the_lowest_priority_first() -> None:
    manager, _ = make(num_blocks=7)
    high, low = [1] * 8 + [0], [2] * 8 + [0]
    allocation = manager.allocate(1, high, len(high), priority=5)
    assert allocation is not None
    manager.commit(1, high, len(high))
    run_and_commit(manager, 2, low)
    manager.free(1)  # released first, yet kept longer: higher priority
    manager.free(2)
    allocation = manager.allocate(3, [9] * 12, 20)
    assert allocation is not None and allocation.blocks == [3, 6, 5, 4, 2]
    assert manager.lookup(high) == 4 and manager.lookup(low) == 0
    manager.check_invariants()


def test_blocks_keep_the_highest_priority_any_request_gave_them() -> None:
    manager, _ = make(num_blocks=7)
    shared, other = [1] * 8 + [0], [2] * 8 + [0]
    run_and_commit(manager, 1, shared)  # priority 0: blocks 1 2 indexed, 3
    manager.free(1)
    run_and_commit(manager, 2, other)  # priority 0: blocks 4 5 indexed, 6
    reuse = manager.allocate(3, shared, len(shared), priority=3)  # raises 1 and 2 to 3
    assert reuse is not None and reuse.blocks == [1, 2, 3]
    manager.free(3)  # shared is released before other
    manager.free(2)
    allocation = manager.allocate(4, [9] * 8, 16)
    assert allocation is not None and allocation.blocks == [3, 6, 5, 4]
    assert manager.lookup(shared) == 8 and manager.lookup(other) == 0
    manager.check_invariants()


def test_identical_blocks_computed_concurrently_keep_the_indexed_one() -> None:
    manager, events = make(num_blocks=12)
    prompt = list(range(9))
    longer = prompt[:8] + [20, 21, 22, 23, 24]
    a = manager.allocate(1, prompt, 9)
    b = manager.allocate(2, longer, 13)  # nothing committed yet: no reuse
    assert a is not None and b is not None and b.blocks == [4, 5, 6, 7]
    manager.commit(1, prompt, 9)  # indexes 1 2
    manager.commit(2, longer, 13)  # 4 5 are twins of 1 2; 6 is indexed below 2
    hashes = chain_hashes(longer, 3)
    assert events[-1].block_hashes == (hashes[2],) and events[-1].parent_hash == hashes[1]
    # Request 2 references the indexed twins 1 and 2 to anchor its block 6 under them.
    assert [manager.ref_count(b) for b in (1, 2, 4, 5, 6)] == [2, 2, 1, 1, 1]
    manager.check_invariants()
    manager.free(1)
    assert [manager.ref_count(b) for b in (1, 2, 3)] == [1, 1, 0]
    assert manager.num_cached_blocks == 0
    manager.free(2)  # the duplicates 4 5 return to the free list, 1 2 6 stay cached
    assert manager.num_cached_blocks == 3
    reuse = manager.allocate(3, longer + [7], 14)
    assert reuse is not None and reuse.blocks[:3] == [1, 2, 6] and reuse.num_cached_tokens == 12
    manager.check_invariants()


def test_without_prefix_caching_nothing_is_indexed() -> None:
    manager, events = make(caching=False)
    tokens = list(range(10))
    run_and_commit(manager, 1, tokens)
    assert manager.lookup(tokens) == 0
    second = manager.allocate(2, tokens, 10)
    assert second is not None and second.num_cached_tokens == 0 and second.blocks == [4, 5, 6]
    manager.free(1)
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == 4
    assert events == []
    manager.check_invariants()


def test_clear_drops_the_index_only_when_idle() -> None:
    manager, events = make()
    tokens = list(range(10))
    run_and_commit(manager, 1, tokens)
    with pytest.raises(RuntimeError, match="1 requests hold blocks"):
        manager.clear()
    manager.free(1)
    manager.clear()
    assert manager.lookup(tokens) == 0 and manager.num_cached_blocks == 0
    assert manager.num_free_blocks == 7
    assert (events[-1].kind, events[-1].block_hashes, events[-1].token_count) == ("cleared", (), 0)
    manager.check_invariants()


def test_bad_arguments_raise_with_the_value() -> None:
    manager, _ = make()
    with pytest.raises(KeyError, match="7"):
        manager.commit(7, [1, 2, 3], 3)
    manager.allocate(1, list(range(6)), 6)
    with pytest.raises(ValueError, match="num_computed_tokens 9 .* 2 blocks"):
        manager.commit(1, list(range(12)), 9)
    with pytest.raises(ValueError, match="exceeds the 6 token_ids"):
        manager.commit(1, list(range(6)), 7)
    with pytest.raises(ValueError, match="-1"):
        manager.allocate(2, [1], -1)
    with pytest.raises(ValueError, match="got 1"):
        BlockManager(1, BS)
    manager.free(99)  # unknown id: no-op
    manager.check_invariants()


def test_check_invariants_catches_corruption() -> None:
    manager, _ = make()
    run_and_commit(manager, 1, list(range(10)))
    manager._ref_counts[2] += 1  # a reference nobody holds
    with pytest.raises(AssertionError, match="block 2: ref count 2, references held 1"):
        manager.check_invariants()
    manager._ref_counts[2] -= 1
    manager._free.append(3)  # a used block on the free list
    with pytest.raises(AssertionError, match="block 3 is in 2 states"):
        manager.check_invariants()


def test_priority_covers_only_the_marked_prefix() -> None:
    """A high-priority system prompt outlives newer low-priority blocks, but the request's
    blocks after the marked prefix are evicted like any others (LRU)."""
    blocks = BlockManager(5, 16)  # 4 usable blocks
    system = list(range(100, 116))
    x = system + list(range(200, 216))
    y = list(range(300, 332))
    assert blocks.allocate(1, x, len(x), priority=5, priority_tokens=16) is not None
    blocks.commit(1, x, len(x))
    blocks.free(1)  # released first: LRU alone would evict x's blocks first
    assert blocks.allocate(2, y, len(y)) is not None
    blocks.commit(2, y, len(y))
    blocks.free(2)
    assert blocks.num_cached_blocks == 4

    assert blocks.allocate(3, list(range(400, 448)), 48) is not None  # evicts 3 blocks
    blocks.check_invariants()
    assert blocks.lookup(x) == 16          # the marked system prompt survived
    assert blocks.lookup(y) == 0           # the newer, unmarked chain did not
    assert blocks.lookup(system + [1, 2, 3]) == 16
