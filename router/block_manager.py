"""Block accounting: which KV blocks each request owns, and which cached prefixes to reuse.

The router decides, before it admits a request, how many blocks it needs once its cached
prefix is reused; the shards only read and write KV where they are told. Three verbs serve
the scheduler (as in vLLM v1): `lookup` the cached prefix, `allocate` blocks or answer that
memory is full, `free` a request's blocks; `commit` publishes a request's written blocks
to the prefix index so that other requests can share them.

Blocks are plain ints. Block 0 is reserved for padding and health probes: it is never
handed out and never counted. Every other block is in exactly one state:

- free: on the free list, holding nothing worth keeping;
- cached: in the prefix index and referenced by no request (evictable);
- used: referenced by at least one request (indexed or not).

`check_invariants` verifies that partition and every reference count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shardgen.router.kv_events import KVEvent, KVEventKind
from shardgen.router.radix import CachedBlock, PrefixIndex


@dataclass(frozen=True)
class Allocation:
    """The result of a successful `BlockManager.allocate`.

    blocks: the request's whole block table, in order (a copy).
    new_blocks: the blocks this call appended, so `blocks[len(blocks) - len(new_blocks):]`;
        on a request's first call that is the whole table, reused blocks included.
    num_cached_tokens: tokens of the prefix reused from the cache, fixed at the request's
        first allocation and repeated unchanged by every later call. The shard must not
        recompute them (it is the first chunk's cache_len).
    """

    blocks: list[int]
    new_blocks: list[int]
    num_cached_tokens: int


@dataclass
class _Request:
    """What the manager keeps per request id."""

    blocks: list[int]
    num_cached_tokens: int
    priority: int
    # Leading blocks that carry `priority`; the ones after them carry 0.
    priority_blocks: int
    # Hashes of the leading blocks already in the index, in order: the reused prefix, the
    # blocks this request committed, and "twins" (another request indexed the same
    # content first). Their count is the number of committed blocks.
    hashes: list[str] = field(default_factory=list)
    # Indexed twins this request references (outside its table) so that its own later
    # blocks, indexed as their children, never have an unreferenced parent.
    pinned: list[int] = field(default_factory=list)
    # Set when a hash collision stopped indexing for this request.
    indexing_stopped: bool = False


class BlockManager:
    """Allocator of KV blocks with a shared, evictable prefix cache.

    Not thread-safe: call it from the engine's loop only. Every method either completes
    or raises before mutating anything.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        event_sink: Callable[[KVEvent], None] | None = None,
    ) -> None:
        """num_blocks counts block 0, as the shard's Warmup answer does."""
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._event_sink = event_sink
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks
        self._index = PrefixIndex(block_size)
        self._requests: dict[int, _Request] = {}
        self._clock = 0  # orders releases for LRU eviction
        self.prefix_hit_tokens_total = 0  # tokens reused at first allocations
        self.evictions_total = 0  # cached blocks evicted to make room

    # ------------------------------------------------------------------ counts

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: the free list plus unreferenced cached blocks."""
        return len(self._free) + self._index.num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - 1 - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix index that no request references (evictable)."""
        return self._index.num_evictable

    def ref_count(self, block_id: int) -> int:
        """References requests hold on `block_id` (tables and pinned twins)."""
        return self._ref_counts[block_id]

    def has_request(self, request_id: int) -> bool:
        """Whether `request_id` holds an allocation (until `free`)."""
        return request_id in self._requests

    # ------------------------------------------------------------------ the verbs

    def lookup(self, token_ids: Sequence[int]) -> int:
        """Tokens of the longest cached block-aligned prefix of `token_ids`. Mutates nothing.

        At most len(token_ids) - 1, rounded down to a block boundary: the last prompt token
        is always computed so that the shard has logits to sample from.
        """
        return len(self._match(token_ids)) * self.block_size

    def indexed_prefix_tokens(self, hashes: Sequence[str]) -> int:
        """Tokens of the leading blocks whose hashes (`radix.block_hashes` of a prompt) the
        index holds: `lookup` without hashing the prompt again, for ordering requests.
        A dictionary probe per block, no check of the tokens: a hash collision would count
        (`lookup` and `allocate` never trust one). 0 with prefix caching off."""
        if not self.enable_prefix_caching:
            return 0
        count = 0
        for digest in hashes:
            if self._index.get_by_hash(digest) is None:
                break
            count += 1
        return count * self.block_size

    def allocate(
        self, request_id: int, token_ids: Sequence[int], num_tokens: int, *, priority: int = 0,
        priority_tokens: int | None = None, reuse: bool = True,
    ) -> Allocation | None:
        """Ensure `request_id` has blocks for positions [0, num_tokens).

        First call for an id: reuse the cached prefix of `token_ids` (as `lookup` finds it,
        even past num_tokens; not with reuse=False, for a request that computes its whole
        prompt anyway), then take the rest from the free list, evicting cached blocks when it
        is empty. `priority` is taken from this first call: the blocks the request
        reuses or commits keep the highest priority any request gave them. With
        `priority_tokens`, only the full blocks among the first priority_tokens tokens get
        it (a shared system prompt, say); the others get 0. Later calls only grow the table;
        their token_ids and priorities are not used.

        Answers None and changes nothing when free plus evictable blocks do not suffice.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
        request = self._requests.get(request_id)
        reused = self._match(token_ids) if request is None and reuse else []
        table_len = len(reused) if request is None else len(request.blocks)
        num_new = max(0, -(-num_tokens // self.block_size) - table_len)
        # Reused blocks that are evictable now stop being so once referenced.
        reused_evictable = sum(1 for block in reused if block.evictable)
        if num_new > self.num_free_blocks - reused_evictable:
            return None
        self._clock += 1
        appended_from = 0 if request is None else len(request.blocks)
        if request is None:
            priority_blocks = (len(token_ids) if priority_tokens is None
                               else priority_tokens) // self.block_size
            request = self._admit(request_id, reused, priority, priority_blocks)
        request.blocks.extend(self._take_blocks(num_new))
        return Allocation(
            list(request.blocks), request.blocks[appended_from:], request.num_cached_tokens
        )

    def commit(self, request_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """The KV of the first `num_computed_tokens` tokens of `token_ids` is written.

        Indexes the request's full blocks among them (with prefix caching on), so other
        requests can share them while this one still runs; emits one "stored" event for the
        blocks newly indexed. Idempotent: blocks already committed are skipped. When another
        request indexed an identical block first, that one stays indexed (this request also
        references it, so its own later blocks can hang below it) and the duplicate is freed
        with the request.
        """
        request = self._requests.get(request_id)
        if request is None:
            raise KeyError(f"commit for unknown request {request_id}")
        if num_computed_tokens > len(token_ids):
            raise ValueError(
                f"num_computed_tokens {num_computed_tokens} exceeds the {len(token_ids)} token_ids"
            )
        if num_computed_tokens > len(request.blocks) * self.block_size:
            raise ValueError(
                f"num_computed_tokens {num_computed_tokens} exceeds the request's "
                f"{len(request.blocks)} blocks of {self.block_size} tokens"
            )
        if not self.enable_prefix_caching or request.indexing_stopped:
            return
        self._clock += 1
        stored: list[CachedBlock] = []
        for position in range(len(request.hashes), num_computed_tokens // self.block_size):
            tokens = token_ids[position * self.block_size : (position + 1) * self.block_size]
            block = self._commit_block(request, position, tokens)
            if block is None:
                break
            if block.block_id == request.blocks[position]:
                stored.append(block)
        if stored:
            self._emit("stored", [b.hash for b in stored], stored[0].parent_hash)

    def free(self, request_id: int) -> None:
        """Drop the request's references. Indexed blocks left unreferenced become
        evictable (most recently released last in LRU order); the others return to the
        free list. Unknown id: no-op."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._clock += 1
        for block_id in request.blocks + request.pinned:
            self._drop_reference(block_id)

    def clear(self) -> None:
        """Drop the whole prefix index (ClearCache) and emit a "cleared" event.

        Only while no request holds blocks: raises RuntimeError otherwise.
        """
        if self._requests:
            raise RuntimeError(
                f"clear() while {len(self._requests)} requests hold blocks; free them first"
            )
        for block in self._index.clear():
            self._free.append(block.block_id)
        self._emit("cleared", [], None)

    # ------------------------------------------------------------------ integrity

    def check_invariants(self) -> None:
        """free + cached + used == num_blocks - 1, each block in one state, reference
        counts equal to the references requests hold, and a well-formed index.

        Raises AssertionError naming the offending block or count. Costs O(num_blocks):
        for tests, and for an idle engine that wants to verify itself.
        """
        expected = [0] * self.num_blocks
        for request_id, request in self._requests.items():
            assert len(set(request.blocks)) == len(request.blocks), (
                f"request {request_id} holds a block twice: {request.blocks}"
            )
            assert len(request.hashes) <= len(request.blocks), f"request {request_id} hashes"
            for block_id in request.blocks + request.pinned:
                expected[block_id] += 1
        assert expected[0] == 0 and self._ref_counts[0] == 0, "block 0 is referenced"
        for block_id in range(self.num_blocks):
            assert self._ref_counts[block_id] == expected[block_id], (
                f"block {block_id}: ref count {self._ref_counts[block_id]}, "
                f"references held {expected[block_id]}"
            )
        free = set(self._free)
        assert len(free) == len(self._free), f"free list has duplicates: {list(self._free)}"
        assert 0 not in free, "block 0 is on the free list"
        for block_id in range(1, self.num_blocks):
            self._check_block_state(block_id, block_id in free)
        used = sum(1 for count in self._ref_counts if count > 0)
        cached = self._index.num_evictable
        assert len(free) + cached + used == self.num_blocks - 1, (
            f"free {len(free)} + cached {cached} + used {used} != {self.num_blocks - 1}"
        )
        assert self.enable_prefix_caching or len(self._index) == 0, "indexed with caching off"
        self._index.check_invariants()

    def _check_block_state(self, block_id: int, on_free_list: bool) -> None:
        cached = self._index.get(block_id)
        referenced = self._ref_counts[block_id] > 0
        states = [on_free_list, cached is not None and not referenced, referenced]
        assert sum(states) == 1, (
            f"block {block_id} is in {sum(states)} states (free, cached, used) = {states}"
        )
        # Requests share blocks only through the index.
        assert cached is not None or self._ref_counts[block_id] <= 1, (
            f"block {block_id} is not indexed but has {self._ref_counts[block_id]} references"
        )
        if cached is not None:
            assert cached.evictable == (not referenced), (
                f"block {block_id}: evictable={cached.evictable}, "
                f"refs={self._ref_counts[block_id]}"
            )

    # ------------------------------------------------------------------ helpers

    def _match(self, token_ids: Sequence[int]) -> list[CachedBlock]:
        """The cached chain `lookup` reports; [] with prefix caching off."""
        if not self.enable_prefix_caching or len(token_ids) < 2:
            return []
        return self._index.match(token_ids, (len(token_ids) - 1) // self.block_size)

    def _admit(self, request_id: int, reused: list[CachedBlock], priority: int,
               priority_blocks: int) -> _Request:
        """Register a new request holding the reused chain."""
        for position, block in enumerate(reused):
            self._add_reference(block.block_id, priority if position < priority_blocks else 0)
        num_cached_tokens = len(reused) * self.block_size
        request = _Request(
            blocks=[b.block_id for b in reused],
            num_cached_tokens=num_cached_tokens,
            priority=priority,
            priority_blocks=priority_blocks,
            hashes=[b.hash for b in reused],
        )
        self._requests[request_id] = request
        self.prefix_hit_tokens_total += num_cached_tokens
        return request

    def _take_blocks(self, count: int) -> list[int]:
        """Take `count` blocks with one reference each: free list first (oldest freed
        first), then evicted cached blocks. The caller checked that they exist."""
        from_free = min(count, len(self._free))
        taken = [self._free.popleft() for _ in range(from_free)]
        if count > from_free:
            evicted = self._index.evict(count - from_free)
            self.evictions_total += len(evicted)
            self._emit("removed", [b.hash for b in evicted], None)
            taken.extend(b.block_id for b in evicted)
        for block_id in taken:
            self._ref_counts[block_id] = 1
        return taken

    def _commit_block(
        self, request: _Request, position: int, token_ids: Sequence[int]
    ) -> CachedBlock | None:
        """Index the request's block at `position` (or adopt its indexed twin); answers the
        indexed block, or None if a hash collision stops indexing for this request."""
        parent_hash = request.hashes[-1] if request.hashes else None
        priority = request.priority if position < request.priority_blocks else 0
        block = self._index.find(parent_hash, token_ids)
        if block is not None:  # a twin: reference it as the parent of what follows
            request.pinned.append(block.block_id)
            self._add_reference(block.block_id, priority)
        else:
            # The parent is held by this request (reused, committed or pinned), so indexed.
            parent = None if parent_hash is None else self._index.get_by_hash(parent_hash)
            block_id = request.blocks[position]
            block = self._index.insert(block_id, parent, token_ids, priority)
            if block is None:
                request.indexing_stopped = True
                return None
        request.hashes.append(block.hash)
        return block

    def _add_reference(self, block_id: int, priority: int) -> None:
        self._ref_counts[block_id] += 1
        block = self._index.get(block_id)
        if block is not None:
            self._index.acquire(block, priority)

    def _drop_reference(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] > 0:
            return
        block = self._index.get(block_id)
        if block is not None:
            self._index.release(block, self._clock)
        else:
            self._free.append(block_id)

    def _emit(self, kind: KVEventKind, hashes: list[str], parent_hash: str | None) -> None:
        if self._event_sink is None or (not hashes and kind != "cleared"):
            return
        self._event_sink(
            KVEvent(kind, tuple(hashes), parent_hash, len(hashes) * self.block_size, time.time())
        )
