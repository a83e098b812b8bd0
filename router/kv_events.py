"""KV cache events: what the router's prefix index stored and removed, for outside eyes.

The block manager emits a `KVEvent` whenever blocks enter the prefix index ("stored"),
leave it by eviction ("removed"), or the whole index is dropped ("cleared"). A
`KVEventHub` fans those events out to any number of asynchronous subscribers, such as an
SSE endpoint that a KV-aware load balancer follows to route requests to the replica
that already holds their prefix. Block hashes are the stable hex digests of
`shardgen.router.radix.block_hash`, so the balancer can compute them from token ids.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

KVEventKind = Literal["stored", "removed", "cleared"]


@dataclass(frozen=True)
class KVEvent:
    """One change to the prefix index.

    kind: "stored" (blocks entered the index), "removed" (evicted from it), or "cleared"
        (the whole index was dropped; block_hashes is empty).
    block_hashes: hex digests of the blocks, in chain order for "stored" (each block is
        the child of the one before it).
    parent_hash: for "stored", the hash of the indexed block the first one extends, or
        None when the chain starts at the beginning of a sequence; None otherwise.
    token_count: tokens covered by the blocks (block count times block size).
    timestamp: wall-clock seconds (time.time()) when the change happened.
    """

    kind: KVEventKind
    block_hashes: tuple[str, ...]
    parent_hash: str | None
    token_count: int
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for an SSE `data:` line)."""
        return {
            "kind": self.kind,
            "block_hashes": list(self.block_hashes),
            "parent_hash": self.parent_hash,
            "token_count": self.token_count,
            "timestamp": self.timestamp,
        }


class KVEventSubscription:
    """One subscriber's bounded stream of events; an async iterator and context manager.

    It is registered with its hub from the moment `KVEventHub.subscribe` returns, so no
    event published after that is missed. Iteration ends after `aclose()` (or leaving the
    `async with` block) or when the hub is closed; the hub forgets a subscription that is
    closed or garbage-collected.
    """

    def __init__(self, hub: KVEventHub, max_queued: int) -> None:
        self._hub = hub
        self._queue: deque[KVEvent] = deque(maxlen=max_queued)
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped: int = 0  # events lost because this subscriber fell behind

    def _push(self, event: KVEvent) -> bool:
        """Queue `event`; answers whether the oldest queued event had to be dropped."""
        if self._closed:
            return False
        full = len(self._queue) == self._queue.maxlen
        if full:
            self.dropped += 1  # the deque drops the oldest on append
        self._queue.append(event)
        self._wakeup.set()
        return full

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> KVEventSubscription:
        return self

    async def __anext__(self) -> KVEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        """Unsubscribe; events already queued are discarded."""
        self._end()
        self._queue.clear()
        self._hub._forget(self)

    async def __aenter__(self) -> KVEventSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class KVEventHub:
    """Fans KV events out to asynchronous subscribers, each with a bounded queue.

    `publish` never blocks and never raises for a slow subscriber: when a subscriber's
    queue is full its oldest event is dropped (and counted in `dropped_total`). Use it
    from the event loop's thread (the engine's loop); it is the `event_sink` to give the
    block manager.
    """

    def __init__(self, max_queued: int = 1024) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self._max_queued = max_queued
        # Weak, so that a subscriber abandoned without aclose() does not stay forever.
        self._subscribers: weakref.WeakSet[KVEventSubscription] = weakref.WeakSet()
        self._closed = False
        self.dropped_total: int = 0  # events dropped over all subscribers, for metrics

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: KVEvent) -> None:
        """Queue `event` for every current subscriber; never blocks."""
        for subscriber in list(self._subscribers):
            if subscriber._push(event):
                self.dropped_total += 1

    def subscribe(self) -> KVEventSubscription:
        """Start receiving every event published from now on.

        Use as `async with hub.subscribe() as events: async for event in events: ...`.
        A subscription taken after `close()` ends at once.
        """
        subscription = KVEventSubscription(self, self._max_queued)
        if self._closed:
            subscription._end()
        else:
            self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """End every subscription once its queued events are read (server shutdown)."""
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber._end()

    def _forget(self, subscription: KVEventSubscription) -> None:
        self._subscribers.discard(subscription)
