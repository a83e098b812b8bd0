"""Randomized block manager runs checked against a model after every operation.

A seeded simulation drives the manager the way the engine does: requests arrive with
prompts that share prefixes, prefill in chunks, decode token by token, commit what they
computed, get preempted when memory is full, and leave. After every operation:

- `check_invariants()` holds;
- the KV each block would hold is simulated slot by slot, so a reused prefix must find
  exactly its own tokens in the blocks it is given, and no request may write a block that
  another request references;
- the prefix index, as the KV events describe it, must hold every block a live request
  committed and nothing that was never committed, never an orphan, and `lookup` must
  agree with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from shardgen.router.block_manager import Allocation, BlockManager
from shardgen.router.kv_events import KVEvent
from shardgen.router.radix import block_hash

BS = 4
BASES = [[random.Random(seed).randrange(50) for _ in range(16)] for seed in range(3)]


@dataclass
class SimRequest:
    tokens: list[int]
    blocks: list[int]
    num_cached_tokens: int
    computed: int  # tokens whose KV is written
    committed: int = 0  # tokens of the last commit


@dataclass
class Model:
    """The index as events describe it, the simulated KV, what was ever committed."""

    indexed: dict[str, str | None] = field(default_factory=dict)  # hash -> parent hash
    committed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # hash -> prefix
    kv: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def apply(self, event: KVEvent) -> None:
        if event.kind == "cleared":
            self.indexed.clear()
            return
        assert event.token_count == BS * len(event.block_hashes) > 0
        if event.kind == "stored":
            parent = event.parent_hash
            assert parent is None or parent in self.indexed, f"stored below unknown {parent}"
            for digest in event.block_hashes:
                assert digest not in self.indexed, f"{digest} stored twice"
                assert digest in self.committed, f"{digest} stored but never committed"
                if parent is not None:  # the chain is the committed prefix, block by block
                    assert self.committed[digest][:-BS] == self.committed[parent]
                self.indexed[digest] = parent
                parent = digest
        else:
            for digest in event.block_hashes:
                assert digest in self.indexed, f"removed unknown {digest}"
                del self.indexed[digest]
            orphans = [h for h, p in self.indexed.items() if p and p not in self.indexed]
            assert not orphans, f"eviction left orphans {orphans}"

    def cached_tokens(self, token_ids: list[int]) -> int:
        """What lookup must answer, from the index the events describe."""
        parent: str | None = None
        limit = max(0, (len(token_ids) - 1) // BS)
        for i in range(limit):
            parent = block_hash(parent, token_ids[i * BS : (i + 1) * BS])
            if parent not in self.indexed:
                return i * BS
        return limit * BS


class Simulation:
    def __init__(self, seed: int, num_blocks: int, caching: bool) -> None:
        self.rng = random.Random(seed)
        self.events: list[KVEvent] = []
        self.manager = BlockManager(
            num_blocks, BS, enable_prefix_caching=caching, event_sink=self.events.append
        )
        self.caching = caching
        self.model = Model()
        self.live: dict[int, SimRequest] = {}
        self.next_id = 0
        self.seen_events = 0

    def random_prompt(self) -> list[int]:
        base = self.rng.choice(BASES)[: self.rng.randrange(17)]
        tail = [self.rng.randrange(50) for _ in range(self.rng.randint(1, 10))]
        return base + tail

    def snapshot(self) -> tuple[object, ...]:
        m = self.manager
        probes = [r.tokens for r in self.live.values()] + BASES
        return (
            (m.num_free_blocks, m.num_cached_blocks, m.num_used_blocks),
            [m.ref_count(b) for b in range(m.num_blocks)],
            [m.lookup(p) for p in probes],
            (m.evictions_total, m.prefix_hit_tokens_total, len(self.events)),
        )

    def allocate(self, request_id: int, tokens: list[int], num_tokens: int) -> Allocation | None:
        before = self.snapshot()
        previous = self.live.get(request_id)
        expected_cached = self.manager.lookup(tokens) if previous is None else None
        priority = self.rng.randrange(3)
        result = self.manager.allocate(request_id, tokens, num_tokens, priority=priority)
        if result is None:
            assert self.snapshot() == before, "a failed allocate changed something"
            return None
        old = [] if previous is None else previous.blocks
        assert 0 not in result.blocks and result.blocks[: len(old)] == old
        assert result.new_blocks == result.blocks[len(old) :]
        assert len(result.blocks) * BS >= num_tokens
        if previous is None:
            assert result.num_cached_tokens == expected_cached
            self.check_reused_kv(tokens, result)
        else:
            assert result.num_cached_tokens == previous.num_cached_tokens
        return result

    def check_reused_kv(self, tokens: list[int], allocation: Allocation) -> None:
        for p in range(allocation.num_cached_tokens):
            slot = (allocation.blocks[p // BS], p % BS)
            assert self.model.kv.get(slot) == tuple(tokens[: p + 1]), f"stale KV in {slot}"

    def write_kv(self, request: SimRequest, end: int) -> None:
        for p in range(request.computed, end):
            block = request.blocks[p // BS]
            assert self.manager.ref_count(block) == 1, f"write into shared block {block}"
            self.model.kv[(block, p % BS)] = tuple(request.tokens[: p + 1])
        request.computed = end

    def commit(self, request_id: int) -> None:
        request = self.live[request_id]
        self.manager.commit(request_id, request.tokens, request.computed)
        parent: str | None = None
        for i in range(request.computed // BS):
            parent = block_hash(parent, request.tokens[i * BS : (i + 1) * BS])
            self.model.committed[parent] = tuple(request.tokens[: (i + 1) * BS])
        request.committed = request.computed
        self.drain_events()

    def drain_events(self) -> None:
        for event in self.events[self.seen_events :]:
            self.model.apply(event)
        self.seen_events = len(self.events)

    # -------------------------------------------------------------- operations

    def op_new(self) -> None:
        tokens = self.random_prompt()
        num_tokens = self.rng.choice([len(tokens), self.rng.randint(1, len(tokens))])
        result = self.allocate(self.next_id, tokens, num_tokens)
        if result is not None:
            cached = result.num_cached_tokens
            request = SimRequest(tokens, list(result.blocks), cached, computed=cached)
            self.live[self.next_id] = request
            self.write_kv(request, max(request.computed, min(num_tokens, len(tokens))))
        self.next_id += 1

    def op_step(self, request_id: int) -> None:
        """The next prefill chunk, or one decode token."""
        request = self.live[request_id]
        if request.computed == len(request.tokens):
            request.tokens.append(self.rng.randrange(50))
        end = min(len(request.tokens), request.computed + self.rng.randint(1, 8))
        result = self.allocate(request_id, request.tokens, end)
        if result is None:  # preempted: the engine frees it and retries later
            self.op_free(request_id)
            return
        request.blocks = list(result.blocks)
        self.write_kv(request, end)
        if self.rng.random() < 0.7:
            self.commit(request_id)

    def op_free(self, request_id: int) -> None:
        self.manager.free(request_id)
        del self.live[request_id]

    def run(self, num_ops: int) -> None:
        for _ in range(num_ops):
            roll = self.rng.random()
            if roll < 0.25 and len(self.live) < 6:
                self.op_new()
            elif roll < 0.85 and self.live:
                self.op_step(self.rng.choice(list(self.live)))
            elif roll < 0.9 and self.live:
                self.commit(self.rng.choice(list(self.live)))  # repeats are no-ops
            elif roll < 0.995 and self.live:
                self.op_free(self.rng.choice(list(self.live)))
            elif not self.live and roll > 0.97:
                self.manager.clear()
            self.check_all()

    def check_all(self) -> None:
        self.manager.check_invariants()
        self.drain_events()
        assert self.caching or not self.events
        probes = [r.tokens for r in self.live.values()] + BASES + [self.random_prompt()]
        for tokens in probes:
            assert self.manager.lookup(tokens) == self.model.cached_tokens(tokens), tokens
        if self.caching:  # what a live request committed stays indexed while it runs
            for request in self.live.values():
                reach = self.model.cached_tokens(request.tokens + [0])
                assert reach >= request.committed // BS * BS, (reach, request.committed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_under_memory_pressure(seed: int) -> None:
    sim = Simulation(seed, num_blocks=24, caching=True)
    sim.run(3000)
    assert sim.manager.evictions_total > 0 and sim.manager.prefix_hit_tokens_total > 0
    for request_id in list(sim.live):
        sim.op_free(request_id)
    sim.check_all()
    assert sim.manager.num_used_blocks == 0


def test_random_operations_without_prefix_caching() -> None:
    sim = Simulation(7, num_blocks=24, caching=False)
    sim.run(1500)
    assert sim.manager.prefix_hit_tokens_total == 0 and sim.manager.num_cached_blocks == 0


def test_lookup_finds_exactly_the_committed_full_blocks() -> None:
    """With room for everything (no eviction), the index is the union of all commits."""
    rng = random.Random(11)
    manager = BlockManager(2400, BS)  # 300 requests of at most 7 blocks
    committed: set[tuple[int, ...]] = set()
    for request_id in range(300):
        tail = [rng.randrange(50) for _ in range(rng.randint(1, 9))]
        tokens = rng.choice(BASES)[: rng.randrange(17)] + tail
        assert manager.allocate(request_id, tokens, len(tokens)) is not None
        num_computed = rng.randint(0, len(tokens))
        manager.commit(request_id, tokens, num_computed)
        committed.update(tuple(tokens[: k * BS]) for k in range(1, num_computed // BS + 1))
        if rng.random() < 0.5:
            manager.free(rng.randrange(request_id + 1))
        manager.check_invariants()
        prefix = tokens[: rng.randint(0, len(tokens))]
        for probe in [tokens + [0], rng.choice(BASES) + [0], prefix]:
            limit = (len(probe) - 1) // BS if probe else 0
            expected = 0
            while expected < limit and tuple(probe[: (expected + 1) * BS]) in committed:
                expected += 1
            assert manager.lookup(probe) == expected * BS, (probe, expected)
    assert manager.evictions_total == 0
