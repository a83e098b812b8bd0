"""The prefix index: which KV blocks hold which block-aligned token prefixes.

A cached block is keyed by a hash chain: its hash covers its parent block's hash and its
own token ids, so one hash names a whole prefix. The index is a tree of such blocks (a
radix tree with one block per edge): a block is reachable only through its parent, so the
index never holds a block whose parent is missing, and eviction takes leaves only.

The index knows nothing of requests or reference counts. The block manager tells it when a
cached block gains its first reference (`acquire`) and loses its last (`release`); the
index keeps the unreferenced ("evictable") blocks and evicts them lowest priority first,
least recently released first within a priority, always from the leaves.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field


def block_hash(parent_hash: str | None, token_ids: Sequence[int]) -> str:
    """The stable hash of one full block: 16 hex digits.

    Defined as blake2b with an 8-byte digest over the parent's 8 digest bytes (nothing for
    the first block of a sequence) followed by the block's token ids as little-endian
    uint32. It is the same in every process and replica (unlike Python's `hash()`), so a
    load balancer that follows KV events can compute it from a prompt's token ids.
    """
    digest = hashlib.blake2b(digest_size=8)
    if parent_hash is not None:
        digest.update(bytes.fromhex(parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return digest.hexdigest()


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[str]:
    """`block_hash` of each of the first num_blocks full blocks of token_ids, chained as the
    index chains them: the hashes a prompt's blocks get when they are committed."""
    data = struct.pack(f"<{num_blocks * block_size}I", *token_ids[:num_blocks * block_size])
    stride = 4 * block_size
    hashes: list[str] = []
    parent = b""
    for start in range(0, len(data), stride):
        parent = hashlib.blake2b(parent + data[start:start + stride], digest_size=8).digest()
        hashes.append(parent.hex())
    return hashes


@dataclass(eq=False)
class CachedBlock:
    """A block in the index. Mutated only by `PrefixIndex`."""

    block_id: int
    hash: str
    parent_hash: str | None
    token_ids: tuple[int, ...]  # kept to tell a hash collision from a hit
    priority: int
    last_released: int = 0  # the manager's clock when its last reference was dropped
    num_children: int = 0  # indexed blocks whose parent this is
    evictable: bool = False  # no request references it
    heap_seq: int = field(default=-1)  # the live eviction-queue entry, -1 if none


class PrefixIndex:
    """Indexed blocks by hash and by block id, and the queue of evictable leaves.

    A block enters the index referenced (the request that computed it holds it); the
    eviction queue holds entries `(priority, last_released, seq, block)` for evictable
    leaves, with stale entries skipped lazily when popped.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._by_hash: dict[str, CachedBlock] = {}
        self._by_id: dict[int, CachedBlock] = {}
        self._queue: list[tuple[int, int, int, CachedBlock]] = []
        self._next_seq = 0
        self.num_evictable = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, block_id: int) -> CachedBlock | None:
        """The indexed block with this id, or None."""
        return self._by_id.get(block_id)

    def get_by_hash(self, digest: str) -> CachedBlock | None:
        """The indexed block with this hash, or None."""
        return self._by_hash.get(digest)

    def find(self, parent_hash: str | None, token_ids: Sequence[int]) -> CachedBlock | None:
        """The indexed block that extends `parent_hash` with exactly `token_ids`, or None.

        Also answers None on a hash collision (same hash, other content).
        """
        block = self._by_hash.get(block_hash(parent_hash, token_ids))
        if block is None or block.parent_hash != parent_hash:
            return None
        return block if block.token_ids == tuple(token_ids) else None

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[CachedBlock]:
        """The indexed chain for the longest prefix of `token_ids`, at most max_blocks.

        Pure: changes nothing, not even recency.
        """
        chain: list[CachedBlock] = []
        parent: str | None = None
        size = self.block_size
        for i in range(min(max_blocks, len(token_ids) // size)):
            block = self.find(parent, token_ids[i * size : (i + 1) * size])
            if block is None:
                break
            chain.append(block)
            parent = block.hash
        return chain

    def insert(
        self, block_id: int, parent: CachedBlock | None, token_ids: Sequence[int], priority: int
    ) -> CachedBlock | None:
        """Index `block_id` as the child of `parent` (None: a sequence's first block).

        The new block is referenced (not evictable). The parent must be indexed and
        referenced too, which keeps every evictable block's descendants evictable.
        Answers None, indexing nothing, when the hash is taken: call it after `find`
        found no twin, so that means a hash collision.
        """
        parent_hash = None if parent is None else parent.hash
        digest = block_hash(parent_hash, token_ids)
        if digest in self._by_hash:
            return None
        assert block_id not in self._by_id, f"block {block_id} already indexed"
        if parent is not None:
            assert self._by_hash.get(parent.hash) is parent, f"parent {parent.hash} not indexed"
            assert not parent.evictable, f"parent block {parent.block_id} is unreferenced"
            parent.num_children += 1
        block = CachedBlock(block_id, digest, parent_hash, tuple(token_ids), priority)
        self._by_hash[digest] = block
        self._by_id[block_id] = block
        return block

    def acquire(self, block: CachedBlock, priority: int) -> None:
        """A request referenced `block`: it keeps the highest priority any request gave it,
        and if it was evictable it is no longer."""
        block.priority = max(block.priority, priority)
        if block.evictable:
            block.evictable = False
            block.heap_seq = -1  # its queue entry, if any, is now stale
            self.num_evictable -= 1

    def release(self, block: CachedBlock, now: int) -> None:
        """The last reference to `block` was dropped at time `now`: it becomes evictable."""
        assert not block.evictable, f"block {block.block_id} released twice"
        block.evictable = True
        block.last_released = now
        self.num_evictable += 1
        if block.num_children == 0:
            self._push(block)

    def evict(self, count: int) -> list[CachedBlock]:
        """Remove `count` evictable blocks from the index, leaves first, lowest priority
        first, least recently released first; answers them in eviction order.

        Requires count <= num_evictable (every evictable block is reachable from an
        evictable leaf, so the queue never runs dry before that).
        """
        assert count <= self.num_evictable, f"evict {count} of {self.num_evictable}"
        evicted: list[CachedBlock] = []
        while len(evicted) < count:
            _, _, seq, block = heapq.heappop(self._queue)
            if block.heap_seq != seq:
                continue  # stale: acquired, re-queued or removed since it was pushed
            self._remove_leaf(block)
            evicted.append(block)
        return evicted

    def clear(self) -> list[CachedBlock]:
        """Drop every block; all must be evictable. Answers the blocks dropped."""
        assert self.num_evictable == len(self._by_id), (
            f"clear with {len(self._by_id) - self.num_evictable} referenced cached blocks"
        )
        blocks = list(self._by_id.values())
        self._by_hash.clear()
        self._by_id.clear()
        self._queue.clear()
        self.num_evictable = 0
        return blocks

    def check_invariants(self) -> None:
        """Tree shape, child counts, the evictable count and queue coverage; raises
        AssertionError with the offending block."""
        children: dict[str, int] = {}
        for digest, block in self._by_hash.items():
            assert block.hash == digest, f"block {block.block_id} filed under {digest}"
            assert self._by_id.get(block.block_id) is block, f"block {block.block_id} by id"
            if block.parent_hash is not None:
                parent = self._by_hash.get(block.parent_hash)
                assert parent is not None, f"block {block.block_id} is an orphan"
                assert not (parent.evictable and not block.evictable), (
                    f"block {block.block_id} is referenced, its parent {parent.block_id} is not"
                )
                children[parent.hash] = children.get(parent.hash, 0) + 1
        assert len(self._by_id) == len(self._by_hash), "id and hash maps differ in size"
        for block in self._by_hash.values():
            expected = children.get(block.hash, 0)
            assert block.num_children == expected, (
                f"block {block.block_id} counts {block.num_children} children, has {expected}"
            )
        evictable = [b for b in self._by_hash.values() if b.evictable]
        assert self.num_evictable == len(evictable), (
            f"num_evictable {self.num_evictable}, actual {len(evictable)}"
        )
        live = {id(b) for _, _, seq, b in self._queue if b.heap_seq == seq}
        for block in evictable:
            if block.num_children == 0:
                assert id(block) in live, f"evictable leaf {block.block_id} not queued"

    def _push(self, block: CachedBlock) -> None:
        self._next_seq += 1
        block.heap_seq = self._next_seq
        entry = (block.priority, block.last_released, self._next_seq, block)
        heapq.heappush(self._queue, entry)
        if len(self._queue) > 2 * len(self._by_id) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale queue entries so the queue stays proportional to the index."""
        self._queue = [e for e in self._queue if e[3].heap_seq == e[2]]
        heapq.heapify(self._queue)

    def _remove_leaf(self, block: CachedBlock) -> None:
        assert block.evictable and block.num_children == 0, f"evict block {block.block_id}"
        del self._by_hash[block.hash]
        del self._by_id[block.block_id]
        block.heap_seq = -1
        self.num_evictable -= 1
        if block.parent_hash is not None:
            parent = self._by_hash[block.parent_hash]
            parent.num_children -= 1
            if parent.evictable and parent.num_children == 0:
                self._push(parent)
