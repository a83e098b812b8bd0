"""The router's gRPC client of the model shards.

One grpc.aio channel per shard, on `unix://{uds_path}-{rank}`. Every batch call goes to all
shards at once (each runs the same step on its slice of the weights) and rank 0's answer is
the one returned. A call fails as a whole, with a `ShardError` naming the first rank that
failed and its gRPC status, as soon as any shard fails: the others are not waited for, since
a shard whose peer died would otherwise block in a collective until the deadline.

Prefill and Decode send at once, when called, not when awaited: the engine hands the last
step's tokens to their streams (hundreds of task wake-ups) after the next step is on its way,
so the shards never wait for the streaming.

Every call carries the caller's trace context (W3C `traceparent`) in its metadata when
there is one, so each shard's span of the call is a child of the router's span.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from shardgen.common.tracing import inject_metadata
from shardgen.proto import generate_pb2, generate_pb2_grpc

logger = logging.getLogger(__name__)

_Response = TypeVar("_Response")

# Reconnect quickly to a shard that is still starting; the default backoff grows to minutes.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ShardError(Exception):
    """A shard failed a call (or could not be reached)."""

    def __init__(self, rank: int, method: str, code: grpc.StatusCode | None, details: str) -> None:
        status = code.name if code is not None else "no status"
        super().__init__(f"shard {rank} failed {method}: {status}: {details}")
        self.rank = rank
        self.method = method
        self.code = code
        self.details = details


class ShardClient:
    """Sends every call to all shards concurrently and returns rank 0's answer.

    step_timeout_s bounds each batch step (Prefill, Decode, FilterBatch, ClearCache): generous,
    but finite, so that a shard that hangs fails its requests instead of stalling the router.
    control_timeout_s bounds Info and Health; warm-up takes its own timeout.
    """

    def __init__(self, uds_path: str, num_shard: int, *, step_timeout_s: float = 600.0,
                 control_timeout_s: float = 30.0) -> None:
        if num_shard < 1:
            raise ValueError(f"num_shard must be at least 1, got {num_shard}")
        self.num_shard = num_shard
        self.urls = [f"unix://{uds_path}-{rank}" for rank in range(num_shard)]
        self._step_timeout_s = step_timeout_s
        self._control_timeout_s = control_timeout_s
        self._channels = [grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
                          for url in self.urls]
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(channel)
                       for channel in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    # ------------------------------------------------------------------ control calls

    async def info(self) -> generate_pb2.InfoResponse:
        """Rank 0's static facts about the model."""
        return await self._call(0, "Info", generate_pb2.InfoRequest(), self._control_timeout_s)

    async def health(self, deep: bool = False) -> None:
        """Raise ShardError unless every shard answers Health (deep: runs a forward)."""
        await self._broadcast("Health", generate_pb2.HealthRequest(deep=deep),
                              self._control_timeout_s)

    async def wait_until_healthy(self, timeout_s: float) -> None:
        """Wait for every shard to answer Health (they may still be starting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                await self._broadcast("Health", generate_pb2.HealthRequest(),
                                      max(min(remaining, 5.0), 0.1), wait_for_ready=True)
                return
            except ShardError as error:
                if remaining <= 0:
                    raise
                logger.info("waiting for the shards: %s", error)
                await asyncio.sleep(min(0.2, max(remaining, 0.0)))

    async def warmup(self, max_batch_prefill_tokens: int, max_batch_size: int,
                     max_total_tokens: int, timeout_s: float, *,
                     max_total_tokens_may_shrink: bool = False) -> generate_pb2.WarmupResponse:
        """Warm every shard up; answers the smallest num_blocks over the shards.

        max_total_tokens_may_shrink: the shards answer with the blocks they hold where one
        sequence of max_total_tokens does not fit, instead of failing (WarmupRequest).
        """
        request = generate_pb2.WarmupRequest(max_batch_prefill_tokens=max_batch_prefill_tokens,
                                             max_batch_size=max_batch_size,
                                             max_total_tokens=max_total_tokens,
                                             max_total_tokens_may_shrink=max_total_tokens_may_shrink)
        answers = await self._broadcast("Warmup", request, timeout_s)
        block_sizes = {answer.block_size for answer in answers}
        if len(block_sizes) != 1:
            raise ShardError(0, "Warmup", None,
                             f"shards disagree on block_size: {[a.block_size for a in answers]}")
        return generate_pb2.WarmupResponse(num_blocks=min(a.num_blocks for a in answers),
                                           block_size=answers[0].block_size)

    # ------------------------------------------------------------------ batch calls

    def prefill(self, batch: generate_pb2.Batch,
                cached_batch: generate_pb2.CachedBatch | None = None,
                block_extensions: Sequence[generate_pb2.BlockTableExtension] = (),
                run_ahead: bool = False, next_requests: Sequence[generate_pb2.Request] = (),
                ) -> Awaitable[generate_pb2.PrefillResponse]:
        """Send the step now; await the result for rank 0's answer. With run_ahead, the
        shards launch the next step (the running requests' decode and next_requests)."""
        request = generate_pb2.PrefillRequest(batch=batch, cached_batch=cached_batch,
                                              block_extensions=block_extensions, run_ahead=run_ahead,
                                              next_requests=next_requests)
        return asyncio.ensure_future(_first(self._broadcast("Prefill", request, self._step_timeout_s)))

    def decode(self, batches: Sequence[generate_pb2.CachedBatch],
               block_extensions: Sequence[generate_pb2.BlockTableExtension] = (),
               run_ahead: bool = False, next_requests: Sequence[generate_pb2.Request] = (),
               ) -> Awaitable[generate_pb2.DecodeResponse]:
        """Send the step now; await the result for rank 0's answer (run_ahead: as prefill)."""
        request = generate_pb2.DecodeRequest(batches=batches, block_extensions=block_extensions,
                                             run_ahead=run_ahead, next_requests=next_requests)
        return asyncio.ensure_future(_first(self._broadcast("Decode", request, self._step_timeout_s)))

    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]
                           ) -> generate_pb2.CachedBatch:
        request = generate_pb2.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        return (await self._broadcast("FilterBatch", request, self._step_timeout_s))[0].batch

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._broadcast("ClearCache", generate_pb2.ClearCacheRequest(id=batch_id),
                              self._step_timeout_s)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, rank: int, method: str, request: object, timeout_s: float,
                    wait_for_ready: bool = False) -> _Response:
        return await self._answer(rank, method,
                                  self._send(rank, method, request, timeout_s, wait_for_ready))

    def _send(self, rank: int, method: str, request: object, timeout_s: float,
              wait_for_ready: bool) -> Awaitable[_Response]:
        """Start the call: grpc.aio queues its invocation on the loop right here."""
        rpc: Callable[..., Awaitable[_Response]] = getattr(self._stubs[rank], method)
        # The metadata carries the span current at the call.
        return rpc(request, timeout=timeout_s, wait_for_ready=wait_for_ready,
                   metadata=inject_metadata() or None)

    @staticmethod
    async def _answer(rank: int, method: str, call: Awaitable[_Response]) -> _Response:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise ShardError(rank, method, error.code(), error.details() or "") from error

    def _broadcast(self, method: str, request: object, timeout_s: float,
                   wait_for_ready: bool = False) -> asyncio.Future[list[_Response]]:
        """Send to all shards now; the future's result is the answers in rank order, or the
        first ShardError at once."""
        calls = [asyncio.ensure_future(self._answer(rank, method, self._send(
                     rank, method, request, timeout_s, wait_for_ready)))
                 for rank in range(self.num_shard)]
        return asyncio.ensure_future(_first_failure(calls))


async def _first_failure(calls: list[asyncio.Future[_Response]]) -> list[_Response]:
    """The calls' results in order, or the first exception as soon as one call fails (the
    others are cancelled)."""
    try:
        done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
        errors = [call.exception() for call in calls if call in done]
        first_error = next((error for error in errors if error is not None), None)
        if first_error is not None:
            raise first_error
        return [call.result() for call in calls]
    finally:
        for call in calls:
            call.cancel()


async def _first(answers: Awaitable[list[_Response]]) -> _Response:
    return (await answers)[0]


async def connect_and_warm_up(uds_path: str, num_shard: int, *, max_batch_prefill_tokens: int,
                              max_batch_size: int, max_total_tokens: int, timeout_s: float,
                              ) -> tuple[ShardClient, generate_pb2.InfoResponse, int, int]:
    """Connect to every shard, wait for Health, then Info and Warmup.

    Returns (client, rank 0's info, num_blocks, block_size), num_blocks being the smallest
    any shard can hold. timeout_s bounds the wait for Health and, separately, the warm-up.
    """
    client = ShardClient(uds_path, num_shard)
    try:
        await client.wait_until_healthy(timeout_s)
        info = await client.info()
        warmup = await client.warmup(max_batch_prefill_tokens, max_batch_size, max_total_tokens,
                                     timeout_s)
    except BaseException:
        await client.close()
        raise
    logger.info("%d shard(s) warmed up: %d KV blocks of %d tokens", num_shard,
                warmup.num_blocks, warmup.block_size)
    return client, info, warmup.num_blocks, warmup.block_size
