"""KV event hub: fan-out, bounded queues that drop the oldest, unsubscribe on exit."""

from __future__ import annotations

import asyncio
import gc
import json

from shardgen.router.block_manager import BlockManager
from shardgen.router.kv_events import KVEvent, KVEventHub


def event(n: int) -> KVEvent:
    return KVEvent("stored", (f"{n:016x}",), None, 4, float(n))


def test_every_subscriber_gets_every_event_in_order() -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        async with hub.subscribe() as first, hub.subscribe() as second:
            assert hub.num_subscribers == 2
            for n in range(3):
                hub.publish(event(n))
            got_first = [await first.__anext__() for _ in range(3)]
            got_second = [await second.__anext__() for _ in range(3)]
        assert got_first == got_second == [event(n) for n in range(3)]
        assert hub.num_subscribers == 0

    asyncio.run(scenario())


def test_a_waiting_subscriber_wakes_on_publish() -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        async with hub.subscribe() as events:
            waiter = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0)
            assert not waiter.done()
            hub.publish(event(7))
            assert await asyncio.wait_for(waiter, timeout=5) == event(7)

    asyncio.run(scenario())


def test_a_slow_subscriber_drops_its_oldest_events_without_blocking_others() -> None:
    async def scenario() -> None:
        hub = KVEventHub(max_queued=2)
        slow = hub.subscribe()
        fast = hub.subscribe()
        received = []
        for n in range(5):
            hub.publish(event(n))
            received.append(await fast.__anext__())
        assert received == [event(n) for n in range(5)]
        assert [await slow.__anext__(), await slow.__anext__()] == [event(3), event(4)]
        assert slow.dropped == 3 and fast.dropped == 0 and hub.dropped_total == 3
        await slow.aclose()
        await fast.aclose()

    asyncio.run(scenario())


def test_close_ends_iteration_after_queued_events() -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        subscription = hub.subscribe()
        hub.publish(event(1))
        hub.close()
        assert [e async for e in subscription] == [event(1)]
        assert [e async for e in hub.subscribe()] == []  # subscribing after close

    asyncio.run(scenario())


def test_an_abandoned_subscription_is_forgotten() -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        subscription = hub.subscribe()
        assert hub.num_subscribers == 1
        del subscription
        gc.collect()
        assert hub.num_subscribers == 0
        hub.publish(event(1))  # nobody to deliver to: no error

    asyncio.run(scenario())


def test_block_manager_events_reach_subscribers_as_json() -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        manager = BlockManager(8, 4, event_sink=hub.publish)
        async with hub.subscribe() as events:
            tokens = list(range(9))
            manager.allocate(1, tokens, 9)
            manager.commit(1, tokens, 9)
            received = await asyncio.wait_for(events.__anext__(), timeout=5)
        payload = json.loads(json.dumps(received.to_dict()))
        assert payload["kind"] == "stored" and payload["token_count"] == 8
        assert payload["parent_hash"] is None and len(payload["block_hashes"]) == 2

    asyncio.run(scenario())
