"""`GET /v1/kv_events`: server-sent events when KV blocks enter or leave the prefix cache.

A load balancer in front of several replicas subscribes to each and routes a request to
the replica that already holds its prefix. Each event names the blocks by their chained
hash (router/radix.py documents the rule, so the balancer can hash prompts the same way):

    data: {"kind": "stored", "block_hashes": ["…"], "parent_hash": "…" | null,
           "token_count": 32, "timestamp": 1763900000.0}

Kinds: "stored" (blocks indexed, in chain order), "removed" (blocks evicted), "cleared"
(the whole index dropped). A subscriber too slow to keep up loses its oldest events;
a balancer should then treat its view of this replica as stale.
"""

from __future__ import annotations

from aiohttp import web

from shardgen.router.kv_events import KVEventHub
from shardgen.router.sse import EventStream

KV_EVENT_HUB = web.AppKey("kv_event_hub", KVEventHub)


def add_kv_events_route(app: web.Application, hub: KVEventHub) -> None:
    app[KV_EVENT_HUB] = hub
    app.router.add_get("/v1/kv_events", stream_kv_events)


async def stream_kv_events(request: web.Request) -> web.StreamResponse:
    stream = EventStream(request)
    await stream.start()  # headers now: a subscriber knows it is connected
    async with request.app[KV_EVENT_HUB].subscribe() as events:
        async for event in events:
            await stream.send(event.to_dict())
    return await stream.finish()
