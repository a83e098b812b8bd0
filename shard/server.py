"""The shard's gRPC service (grpc.aio) on its unix socket.

Calls that touch the model or the batch state run one at a time, in arrival order, on
one worker thread: the event loop stays free, so a shallow Health answers at once even
during a long step. With several ranks, the router sends every call to all of them, and
each runs the same sequence of steps (their collectives pair up in that order).

With tracing on, every batch RPC runs in a span (shard/rpc_tracing.py) and the step thread
runs in the RPC's context, so the runner's spans and log lines belong to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import TypeVar

import grpc

from shardgen.common.tracing import tracing_enabled
from shardgen.proto import generate_pb2, generate_pb2_grpc
from shardgen.shard.config import ShardConfig
from shardgen.shard.interceptor import ExceptionToStatusInterceptor
from shardgen.shard.rpc_tracing import TracingInterceptor
from shardgen.shard.runner import ModelRunner
from shardgen.shard.warmup import device_memory_bytes

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Prefill requests carry whole prompts and their slots: no 4 MiB cap.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def shard_version() -> str:
    try:
        return metadata.version("shardgen")
    except metadata.PackageNotFoundError:
        return "unknown"


class ShardServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    """TextGenerationService over one ModelRunner."""

    def __init__(self, runner: ModelRunner, config: ShardConfig) -> None:
        self._runner = runner
        self._config = config
        self._lock = asyncio.Lock()  # fair: waiters run in arrival order
        # The CUDA device is per thread: the step thread must use this rank's, not cuda:0.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-step",
                                            initializer=runner.bind_thread)

    async def _serial(self, function: Callable[..., T], *args: object) -> T:
        """Run `function` on the step thread, after every call that arrived before, in a
        copy of this call's context (its span is the parent of the runner's)."""
        run = contextvars.copy_context().run
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run,
                                                                    function, *args)

    def close(self) -> None:
        """Stop accepting steps (one that is running finishes on its thread)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def Info(self, request: generate_pb2.InfoRequest,
                   context: grpc.aio.ServicerContext) -> generate_pb2.InfoResponse:
        facts, config = self._runner.facts, self._config
        return generate_pb2.InfoResponse(
            model_id=config.model_id, architecture=facts.architecture,
            dtype=str(self._runner.dtype).removeprefix("torch."),
            device_type=self._runner.device.type, block_size=self._runner.spec.block_size,
            world_size=config.world_size, rank=config.rank, vocab_size=facts.vocab_size,
            max_position_embeddings=facts.max_positions, eos_token_ids=facts.eos_token_ids,
            version=shard_version(), runs_ahead=self._runner.run_ahead,
            device_memory_bytes=device_memory_bytes(self._runner.device))

    async def Health(self, request: generate_pb2.HealthRequest,
                     context: grpc.aio.ServicerContext) -> generate_pb2.HealthResponse:
        """Shallow: answers at once, even during a step. Deep: a forward pass queued behind
        the steps; with several ranks it takes a collective, so send it to every rank."""
        if request.deep:
            await self._serial(self._runner.health, True)
        return generate_pb2.HealthResponse()

    async def ServiceDiscovery(self, request: generate_pb2.ServiceDiscoveryRequest,
                               context: grpc.aio.ServicerContext
                               ) -> generate_pb2.ServiceDiscoveryResponse:
        return generate_pb2.ServiceDiscoveryResponse(urls=self._config.shard_addresses())

    async def ClearCache(self, request: generate_pb2.ClearCacheRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.ClearCacheResponse:
        batch_id = request.id if request.HasField("id") else None
        await self._serial(self._runner.clear_cache, batch_id)
        return generate_pb2.ClearCacheResponse()

    async def FilterBatch(self, request: generate_pb2.FilterBatchRequest,
                          context: grpc.aio.ServicerContext) -> generate_pb2.FilterBatchResponse:
        batch = await self._serial(self._runner.filter_batch, request)
        return generate_pb2.FilterBatchResponse(batch=batch)

    async def Warmup(self, request: generate_pb2.WarmupRequest,
                     context: grpc.aio.ServicerContext) -> generate_pb2.WarmupResponse:
        return await self._serial(self._runner.warmup, request)

    async def Prefill(self, request: generate_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> generate_pb2.PrefillResponse:
        return await self._serial(self._runner.prefill, request)

    async def Decode(self, request: generate_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> generate_pb2.DecodeResponse:
        return await self._serial(self._runner.decode, request)


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by an earlier run; refuse to delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    logger.info("removing the stale socket %s", path)
    os.unlink(path)


async def start_server(servicer: ShardServicer, config: ShardConfig) -> grpc.aio.Server:
    """Listen on this rank's unix socket with the exception-to-status interceptor (and,
    outside it, the tracing one when tracing is on)."""
    remove_stale_socket(config.socket_path)
    interceptors: list[grpc.aio.ServerInterceptor] = [ExceptionToStatusInterceptor()]
    if tracing_enabled():
        interceptors.insert(0, TracingInterceptor(config.rank))
    server = grpc.aio.server(interceptors=interceptors, options=_CHANNEL_OPTIONS)
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    server.add_insecure_port(config.address)
    await server.start()
    logger.info("serving on %s", config.address)
    return server


async def serve_until(stop: asyncio.Event, servicer: ShardServicer, config: ShardConfig,
                      grace_s: float = 5.0) -> None:
    """Serve until `stop` is set, then stop gracefully and remove the socket file."""
    server = await start_server(servicer, config)
    try:
        await stop.wait()
        logger.info("stopping")
    finally:
        await server.stop(grace=grace_s)
        servicer.close()
        try:
            os.unlink(config.socket_path)
        except FileNotFoundError:
            pass
