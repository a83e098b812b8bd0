"""`shardgen-router`: connect to the shards, warm them up, serve HTTP, drain on SIGTERM.

Start-up: parse argv into a RouterConfig; wait for every shard to answer Health; read the
model's Info to settle the token limits that default to the model's; warm the shards up
with those limits (loading the tokenizer meanwhile); build the engine; serve HTTP. The
HTTP port opens only when all of that succeeded, so /health answering means ready.

Shutdown (SIGTERM or SIGINT): new requests get 503, requests in the engine get
--drain-timeout seconds to finish, then the HTTP server and the shard channels close and
the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web

from shardgen.common.logging import setup_logging
from shardgen.common.tracing import setup_tracing, shutdown_tracing
from shardgen.proto import generate_pb2
from shardgen.router.api import build_app
from shardgen.router.config import ConfigError, RouterConfig, parse_args, resolve_limits
from shardgen.router.kv_events import KVEventHub
from shardgen.router.metrics import Metrics
from shardgen.router.server import ModelInfo, stop_accepting
from shardgen.router.tokenization import Tokenizer

logger = logging.getLogger("shardgen.router")

_HTTP_SHUTDOWN_TIMEOUT_S = 5.0


def model_info(config: RouterConfig, info: generate_pb2.InfoResponse, block_size: int,
               ) -> ModelInfo:
    """What /info reports about the model, from rank 0's Info answer."""
    return ModelInfo(model_id=config.served_model_name or info.model_id, dtype=info.dtype,
                     device_type=info.device_type, block_size=block_size,
                     num_shard=config.num_shard,
                     max_position_embeddings=info.max_position_embeddings,
                     version=info.version)


def _engine(config: RouterConfig, max_batch_total_tokens: int | None, client: Any,
            num_blocks: int, block_size: int, metrics: Metrics, kv_events: KVEventHub,
            runs_ahead: bool) -> Any:
    """The engine over the warmed-up shards, its state gauges bound to metrics.

    max_batch_total_tokens: the bound the user gave, or None; the resolved config's value
    (the whole KV capacity by default) is for /info, the KV blocks themselves bound the rest.
    runs_ahead: the shards run steps ahead (Info), so prompts are planned a step early.
    """
    from shardgen.router.block_manager import BlockManager  # gRPC and friends: only here
    from shardgen.router.engine import Engine, SchedulerConfig

    assert config.max_batch_prefill_tokens is not None and config.max_concurrent_requests is not None
    scheduler = SchedulerConfig(
        max_concurrent_requests=config.max_concurrent_requests,
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        max_batch_size=config.max_batch_size,
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        enable_prefix_caching=config.enable_prefix_caching,
        scheduling_policy=config.scheduling_policy,
        admit_ahead=runs_ahead)
    blocks = BlockManager(num_blocks, block_size,
                          enable_prefix_caching=config.enable_prefix_caching,
                          event_sink=kv_events.publish)
    engine = Engine(client, scheduler, blocks, metrics=metrics)
    metrics.bind_state(queue_size=lambda: engine.queue_size,
                       batch_size=lambda: engine.running_size,
                       kv_blocks_total=lambda: num_blocks - 1,  # block 0 is reserved
                       kv_blocks_used=lambda: blocks.num_used_blocks,
                       kv_blocks_cached=lambda: blocks.num_cached_blocks)
    return engine


async def _start(config: RouterConfig, metrics: Metrics, kv_events: KVEventHub
                 ) -> tuple[Any, Any, Tokenizer, RouterConfig, ModelInfo]:
    """Connect, settle the limits, warm up; returns (client, engine, tokenizer, config, info)."""
    from shardgen.router.client import ShardClient

    client = ShardClient(config.uds_path, config.num_shard)
    tokenizer_task = asyncio.ensure_future(
        asyncio.to_thread(Tokenizer.from_pretrained, config.tokenizer,
                          workers=config.tokenizer_workers))
    try:
        await client.wait_until_healthy(config.shard_timeout_s)
        info = await client.info()
        device = dict(max_position_embeddings=info.max_position_embeddings,
                      device_type=info.device_type, device_memory_bytes=info.device_memory_bytes)
        limits = resolve_limits(config, **device)
        assert limits.max_batch_prefill_tokens is not None and limits.max_total_tokens is not None
        assert limits.max_concurrent_requests is not None
        warmup = await client.warmup(
            limits.max_batch_prefill_tokens,
            limits.max_batch_size or limits.max_concurrent_requests,
            limits.max_total_tokens, config.shard_timeout_s,
            max_total_tokens_may_shrink=config.max_total_tokens is None)
        # Block 0 is reserved: the others hold requests.
        capacity = (warmup.num_blocks - 1) * warmup.block_size
        resolved = resolve_limits(config, **device, kv_capacity_tokens=capacity)
        tokenizer = await tokenizer_task
    except BaseException:
        tokenizer_task.cancel()
        await client.close()
        raise
    logger.info("serving %s: max_input_tokens=%s max_total_tokens=%s "
                "max_batch_prefill_tokens=%s max_batch_total_tokens=%s (%d KV blocks of %d) "
                "max_batch_size=%s max_concurrent_requests=%s",
                config.served_model_name, resolved.max_input_tokens, resolved.max_total_tokens,
                resolved.max_batch_prefill_tokens, resolved.max_batch_total_tokens,
                warmup.num_blocks, warmup.block_size, resolved.max_batch_size,
                resolved.max_concurrent_requests)
    engine = _engine(resolved, config.max_batch_total_tokens, client, warmup.num_blocks,
                     warmup.block_size, metrics, kv_events, info.runs_ahead)
    return client, engine, tokenizer, resolved, model_info(config, info, warmup.block_size)


def _stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _start_or_stop(config: RouterConfig, metrics: Metrics, kv_events: KVEventHub,
                         stop: asyncio.Event
                         ) -> tuple[Any, Any, Tokenizer, RouterConfig, ModelInfo] | None:
    """`_start`, unless a signal comes first (then None): warm-up may take minutes."""
    starting = asyncio.ensure_future(_start(config, metrics, kv_events))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    return None


async def serve(config: RouterConfig) -> int:
    """Run the router until SIGTERM/SIGINT; returns the exit status."""
    stop = _stop_event()
    metrics = Metrics()
    kv_events = KVEventHub()
    started = await _start_or_stop(config, metrics, kv_events, stop)
    if started is None:
        logger.info("stopped during start-up")
        return 0
    client, engine, tokenizer, resolved, info = started
    app = build_app(resolved, tokenizer, engine, info, metrics=metrics, kv_events=kv_events)
    # handler_cancellation: a client that goes away cancels its handler, which cancels
    # its engine request, instead of generating for nobody.
    # Once the engine has drained, handlers only write their last bytes: a short grace.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=_HTTP_SHUTDOWN_TIMEOUT_S)
    drain_timeout_s = 0.0  # on a failure below, fail whatever the engine holds at once
    try:
        await engine.start()
        await runner.setup()
        await web.TCPSite(runner, config.hostname, config.port).start()
        logger.info("listening on http://%s:%d", config.hostname, config.port)
        await stop.wait()
        logger.info("shutting down: draining for up to %.0f s", config.drain_timeout_s)
        stop_accepting(app)
        drain_timeout_s = config.drain_timeout_s
    finally:
        kv_events.close()  # ends the event streams, which would otherwise hold HTTP open
        await _shut_down(engine, runner, client, tokenizer, drain_timeout_s)
    logger.info("stopped")
    return 0


async def _shut_down(engine: Any, runner: web.AppRunner, client: Any, tokenizer: Tokenizer,
                     drain_timeout_s: float) -> None:
    """Drain the engine, then close HTTP, the shard channels and the tokenizer thread;
    each step runs even when an earlier one failed."""
    try:
        await engine.stop(drain_timeout_s)
    finally:
        try:
            await runner.cleanup()
        finally:
            await client.close()
            tokenizer.close()


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `shardgen-router` and `python -m shardgen.router`."""
    try:
        config = parse_args(argv)
    except ConfigError as error:
        sys.exit(f"shardgen-router: {error}")
    setup_logging("router", json_output=config.json_output, level=config.log_level)
    setup_tracing(config.otlp_service_name, config.otlp_endpoint)
    try:
        code = _run(serve(config))
    except ConfigError as error:
        logger.error("%s", error)
        code = 1
    except Exception:
        # Start-up failed (a shard did not answer, warm-up failed...): say why, exit 1.
        logger.exception("the router stopped on an error")
        code = 1
    finally:
        shutdown_tracing()
    sys.exit(code)


if __name__ == "__main__":
    main()
