"""Prefix index: the stable block hash, tree shape, leaf-first eviction, collisions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from shardgen.router import radix
from shardgen.router.block_manager import BlockManager
from shardgen.router.radix import PrefixIndex, block_hash


def reference_hash(parent_hex: str | None, token_ids: list[int]) -> str:
    """The documented rule, written out independently of the implementation."""
    data = b"" if parent_hex is None else bytes.fromhex(parent_hex)
    data += b"".join(t.to_bytes(4, "little") for t in token_ids)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def test_block_hash_follows_the_documented_rule() -> None:
    first = block_hash(None, [1, 2, 3, 4])
    assert first == reference_hash(None, [1, 2, 3, 4]) and len(first) == 16
    second = block_hash(first, [70000, 0, 2**32 - 1, 5])
    assert second == reference_hash(first, [70000, 0, 2**32 - 1, 5])
    # The parent is part of the key: the same tokens under another parent differ.
    assert block_hash(None, [70000, 0, 2**32 - 1, 5]) != second


def test_block_hash_is_the_same_in_another_process() -> None:
    code = (
        "from shardgen.router.radix import block_hash\n"
        "print(block_hash(block_hash(None, [5, 6]), [7, 8]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == block_hash(block_hash(None, [5, 6]), [7, 8])


def build_chain(index: PrefixIndex, first_id: int, tokens: list[int]) -> list[radix.CachedBlock]:
    """Insert tokens as a chain of blocks with ids first_id, first_id + 1, ..."""
    blocks: list[radix.CachedBlock] = []
    size = index.block_size
    for i in range(len(tokens) // size):
        parent = blocks[-1] if blocks else None
        block = index.insert(first_id + i, parent, tokens[i * size : (i + 1) * size], 0)
        assert block is not None
        blocks.append(block)
    return blocks


def test_match_walks_the_chain_and_stops_at_the_first_miss() -> None:
    index = PrefixIndex(block_size=2)
    chain = build_chain(index, 10, [1, 2, 3, 4, 5, 6])
    branch = index.insert(20, chain[0], [9, 9], 0)
    assert branch is not None and chain[0].num_children == 2
    assert [b.block_id for b in index.match([1, 2, 3, 4, 5, 6, 7], max_blocks=9)] == [10, 11, 12]
    assert [b.block_id for b in index.match([1, 2, 3, 4, 5, 6], max_blocks=2)] == [10, 11]
    assert [b.block_id for b in index.match([1, 2, 9, 9, 5, 6], max_blocks=9)] == [10, 20]
    assert index.match([2, 1, 3, 4], max_blocks=9) == []
    assert [b.block_id for b in index.match([1, 2, 3], max_blocks=9)] == [10]  # partial block
    index.check_invariants()


def test_evicts_leaves_first_then_their_parents() -> None:
    index = PrefixIndex(block_size=2)
    chain = build_chain(index, 1, [1, 2, 3, 4, 5, 6])
    side = index.insert(4, chain[0], [8, 8], 0)
    assert side is not None
    # Release the root first: were it not for leaf-first, it would be the LRU victim.
    for now, block in enumerate([chain[0], chain[1], side, chain[2]]):
        index.release(block, now)
    index.check_invariants()
    assert [b.block_id for b in index.evict(4)] == [4, 3, 2, 1]
    assert len(index) == 0 and index.num_evictable == 0
    index.check_invariants()


def test_acquired_blocks_are_not_evicted_and_queue_stays_bounded() -> None:
    index = PrefixIndex(block_size=1)
    blocks = [index.insert(i, None, [i], 0) for i in range(1, 4)]
    assert all(b is not None for b in blocks)
    a, b, c = blocks  # type: ignore[misc]
    for now in range(500):  # churn: every release pushes a queue entry
        index.release(a, now)
        index.acquire(a, 0)
    assert len(index._queue) <= 2 * len(index) + 64
    index.release(b, 1000)
    index.release(c, 1001)
    index.release(a, 1002)
    index.acquire(b, 0)
    assert [x.block_id for x in index.evict(2)] == [3, 1]
    index.check_invariants()


def test_insert_refuses_an_unreferenced_parent() -> None:
    index = PrefixIndex(block_size=1)
    root = index.insert(1, None, [1], 0)
    assert root is not None
    index.release(root, 0)
    with pytest.raises(AssertionError, match="parent block 1 is unreferenced"):
        index.insert(2, root, [2], 0)


def test_a_hash_collision_is_not_a_hit_and_stops_indexing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a hash that collides on purpose, different content never matches."""
    monkeypatch.setattr(radix, "block_hash", lambda parent, tokens: f"{sum(tokens):016x}")
    manager = BlockManager(10, 2)
    manager.allocate(1, [1, 2, 0], 3)
    manager.commit(1, [1, 2, 0], 2)  # indexed under "sum 3"
    assert manager.lookup([2, 1, 0]) == 0  # same hash, other tokens: a miss
    assert manager.lookup([1, 2, 0]) == 2
    manager.allocate(2, [2, 1, 5, 5, 0], 5)
    manager.commit(2, [2, 1, 5, 5, 0], 4)  # collides at its first block: nothing indexed
    manager.check_invariants()
    assert manager.lookup([2, 1, 5, 5, 0]) == 0
    manager.free(1)
    manager.free(2)
    assert manager.num_cached_blocks == 1
    manager.check_invariants()
