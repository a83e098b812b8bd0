"""The router's engine: the queue, the continuous-batching loop and per-request streams.

The HTTP layer calls `Engine.submit` and iterates the returned `RequestHandle`. One task, the
batching loop, asks the `Scheduler` for each step, sends it to the shards as one Prefill (new
prompts or chunks of them, together with one decode token of every running request) or one
Decode, and pushes what came back into the handles. The shards keep a single cached batch
between steps.

A step the shards fail fails the requests of that step only (GenerationError, HTTP 424): their
blocks are freed, the shards' cache is cleared, and the loop goes on with the queue. When the
step ran out of device memory (RESOURCE_EXHAUSTED), the next steps also get a smaller prefill
budget. A request that passes its deadline fails with RequestTimeoutError (HTTP 504).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from shardgen.proto import generate_pb2

from . import engine_spans
from .client import ShardClient, ShardError, connect_and_warm_up
from .engine_spans import NO_SPANS, RequestSpans, request_spans, step_span
from .requests import (FinishReason, GenerationError, GenerationRequest, PrefillEvent,
                       QueueFullError, RequestTimeoutError, TokenEvent)
from .scheduler import (BatchMismatchError, PrefillChunk, Scheduler, SchedulerConfig, Sequence,
                        StepPlan, slot_range)

if TYPE_CHECKING:
    from .block_manager import BlockManager
    from .metrics import Metrics

__all__ = ["Engine", "EngineStoppedError", "RequestHandle", "SchedulerConfig",
           "connect_and_warm_up"]

logger = logging.getLogger(__name__)

Event = PrefillEvent | TokenEvent

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generate_pb2.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
}


class EngineStoppedError(QueueFullError):
    """The engine is draining for shutdown and takes no new requests."""


class RequestHandle:
    """The stream of one request: PrefillEvent, then TokenEvents until one has finish_reason.

    Iteration raises GenerationError when the request fails. After `cancel()` iteration ends
    at once and the engine drops the request at its next step.
    """

    def __init__(self, request_id: int, on_cancel: Callable[[int], None]) -> None:
        self.id = request_id
        self._on_cancel = on_cancel
        self._events: deque[Event] = deque()
        # The stream's task waits on this future when it has read every event: one
        # future per wait is cheaper than an asyncio.Event per token at hundreds of streams.
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._cancelled = False
        self._error: GenerationError | None = None

    @property
    def done(self) -> bool:
        """The engine is finished with this request (completed, failed or cancelled)."""
        return self._closed

    def cancel(self) -> None:
        """Stop the request (stop sequence matched, client gone); idempotent."""
        if self._cancelled:
            return
        self._cancelled = True
        self._events.clear()
        self._wake()
        if not self._closed:
            self._closed = True
            self._on_cancel(self.id)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._events:
                return self._events.popleft()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # The engine's side.

    def _push(self, event: Event) -> None:
        if not self._closed:
            self._events.append(event)
            self._wake()

    def _close(self, error: GenerationError | None = None) -> None:
        if not self._closed:
            self._closed = True
            self._error = error
            self._wake()


@dataclass(eq=False)
class _Entry:
    """What the engine keeps per request beside the scheduler's Sequence."""

    request: GenerationRequest
    handle: RequestHandle
    parameters: generate_pb2.NextTokenChooserParameters
    spans: RequestSpans = NO_SPANS
    # When the engine took the request, and when its first prefill started (loop clock).
    submitted: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    # Prompt logprobs gathered over the chunks of a chunked prefill, sent as one event.
    prefill_ids: list[int] = field(default_factory=list)
    prefill_logprobs: list[float] = field(default_factory=list)


class Engine:
    """Queue and continuous-batching loop in front of the shards (see module docstring)."""

    def __init__(self, client: ShardClient, config: SchedulerConfig, blocks: BlockManager, *,
                 metrics: Metrics | None = None) -> None:
        """metrics, when given, gets the per-step figures (batch size, step and forward
        durations, preemptions, prefix-cache hits)."""
        self._client = client
        self._config = config
        self._blocks = blocks
        self._metrics = metrics
        self._prefix_hits_seen = blocks.prefix_hit_tokens_total
        self._block_size = blocks.block_size
        self._scheduler = Scheduler(config, blocks)
        self._entries: dict[int, _Entry] = {}
        self._cancelled: list[int] = []
        self._request_ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._batch_id: int | None = None  # the shards' cached batch
        # What the last step answered, for the streams: handed over once the next step is
        # on its way to the shards (or before anything else touches the requests).
        self._undelivered: list[generate_pb2.Generation] = []
        self._answered = time.perf_counter()  # when the last step's answer came (debug log)
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_size(self) -> int:
        return self._scheduler.num_waiting

    @property
    def running_size(self) -> int:
        return self._scheduler.num_active

    async def start(self) -> None:
        """Start the batching loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shardgen-batching-loop")

    async def stop(self, drain_timeout_s: float) -> None:
        """Take no new requests, let those in the engine finish for up to drain_timeout_s,
        then fail the rest and stop the loop. The client stays open (its owner closes it)."""
        self._stopping = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("%d request(s) still in the engine after draining %.1f s",
                           len(self._entries), drain_timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        # A step may have been in flight: whatever the shards hold is stale now.
        await self._fail_everything("the server stopped before the request finished")

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; its handle streams the results.

        Raises QueueFullError when max_concurrent_requests are in the engine already,
        EngineStoppedError while stopping, ValueError for a request that can never fit.
        """
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        limit = self._config.max_concurrent_requests
        if len(self._entries) >= limit:
            raise QueueFullError(f"{len(self._entries)} requests are in the engine already "
                                 f"(max_concurrent_requests={limit})")
        self._scheduler.check_fits(len(request.input_ids), request.stopping.max_new_tokens)
        request_id = next(self._request_ids)
        handle = RequestHandle(request_id, self._on_cancel)
        self._entries[request_id] = _Entry(request, handle, request.sampling.to_proto(),
                                           request_spans(request.trace_context, request_id))
        self._scheduler.add(Sequence(
            request_id=request_id, token_ids=list(request.input_ids),
            prompt_len=len(request.input_ids), max_new_tokens=request.stopping.max_new_tokens,
            priority=request.cache_priority, priority_tokens=request.cache_priority_tokens,
            deadline=request.deadline,
            prefill_logprobs=request.prefill_logprobs))
        self._drained.clear()
        self._wakeup.set()
        return handle

    # ------------------------------------------------------------------ the loop

    def _on_cancel(self, request_id: int) -> None:
        # Applied by the loop between steps: the step in flight may still hold the request.
        self._cancelled.append(request_id)
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            self._apply_cancels()
            if not self._scheduler.has_work:
                self._deliver_undelivered()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                did_work = await self._step()
            except Exception:
                # A bug here must not stop serving: fail what is in flight, start afresh.
                logger.exception("the batching loop failed a step")
                await self._fail_everything("internal error in the router's batching loop")
                did_work = True
            if not did_work:
                # Nothing can run until a request arrives, leaves or passes its deadline.
                self._deliver_undelivered()
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=0.1)
                except asyncio.TimeoutError:
                    pass

    def _apply_cancels(self) -> None:
        cancelled, self._cancelled = self._cancelled, []
        for request_id in cancelled:
            self._scheduler.remove(request_id)
            self._forget(request_id, "cancelled")

    async def _step(self) -> bool:
        """Plan and run one step; False when there was nothing to send."""
        now = time.monotonic()
        plan = self._scheduler.schedule(now)
        if plan.failed or plan.preempted or plan.is_empty:
            self._deliver_undelivered()  # before those requests close or start over
        for seq, reason in plan.failed:
            self._close(seq.request_id, _failure(seq, reason, now))
        for seq in plan.preempted:
            self._restart(seq)
        if plan.preempted:
            logger.info("preempted %d request(s): KV blocks ran out", len(plan.preempted))
            if self._metrics is not None:
                self._metrics.preemptions.inc(len(plan.preempted))
        if plan.is_empty:
            if plan.batch_changed and self._batch_id is not None:
                # Every running request left: nothing to keep on the shards.
                self._batch_id = None
                await self._clear_shard_cache()
            return bool(plan.failed)
        try:
            if plan.batch_changed:
                await self._filter_running_batch(plan)
            generations, batch = await self._forward(plan)
            self._batch_id = batch.id if batch is not None else None
            tokens, finished = _outcome(generations)
            self._scheduler.complete(plan, tokens, finished,
                                     list(batch.request_ids) if batch is not None else [])
        except (ShardError, BatchMismatchError) as error:
            self._deliver_undelivered()
            await self._abort_step(plan, error)
            return True
        self._undelivered = generations
        return True

    async def _filter_running_batch(self, plan: StepPlan) -> None:
        if self._batch_id is None:
            return
        if not plan.decoding:
            batch_id, self._batch_id = self._batch_id, None
            await self._client.clear_cache(batch_id)
            return
        batch_id, kept = self._batch_id, [seq.request_id for seq in plan.decoding]
        with step_span("filter", lambda: self._riders(plan.decoding, []),
                       lambda: {engine_spans.BATCH_ID: batch_id,
                                engine_spans.BATCH_SIZE: len(kept)}):
            batch = await self._client.filter_batch(batch_id, kept)
        self._batch_id = batch.id

    async def _forward(self, plan: StepPlan) -> tuple[list[generate_pb2.Generation],
                                                      generate_pb2.CachedBatch | None]:
        """Send the step: Prefill when it has prompt chunks, else Decode."""
        extensions = [generate_pb2.BlockTableExtension(request_id=request_id, blocks=blocks)
                      for request_id, blocks in plan.extensions.items()]
        cached = None
        if plan.decoding:
            if self._batch_id is None:
                raise RuntimeError("running requests but no cached batch on the shards")
            cached = generate_pb2.CachedBatch(
                id=self._batch_id, request_ids=[seq.request_id for seq in plan.decoding])
        self._note_scheduled(plan.chunks)
        method = "prefill" if plan.chunks else "decode"
        # The shards start the next step now when it is planned (its prompts are sent along)
        # or likely this batch's plain decode.
        next_requests = [self._request_proto(chunk) for chunk in plan.next_chunks]
        run_ahead = bool(next_requests) or self._scheduler.decodes_only_next(plan)
        started = time.perf_counter()
        with step_span(method, lambda: self._riders(plan.decoding, plan.chunks),
                       lambda: _step_attributes(plan)) as span:
            answer: Awaitable[generate_pb2.PrefillResponse | generate_pb2.DecodeResponse]
            if plan.chunks:
                batch = generate_pb2.Batch(id=next(self._batch_ids),
                                           requests=[self._request_proto(c) for c in plan.chunks])
                span.set_attribute(engine_spans.BATCH_ID, batch.id)
                answer = self._client.prefill(batch, cached, extensions, run_ahead, next_requests)
            else:
                assert cached is not None
                answer = self._client.decode([cached], extensions, run_ahead, next_requests)
            # One turn of the loop runs the call's invocation task, which sends the step;
            # then the streams get the last step's tokens while it runs.
            await asyncio.sleep(0)
            self._deliver_undelivered()
            response = await answer
            answered = time.perf_counter()
            if span.is_recording():
                span.set_attributes({engine_spans.FORWARD_NS: response.timings.forward_ns,
                                     engine_spans.STEP_NS: response.timings.total_ns})
        if self._metrics is not None:
            self._observe_step(method, plan, response, started)
        if logger.isEnabledFor(logging.DEBUG):
            _log_step(method, plan, run_ahead, response, started, started - self._answered)
        self._answered = answered
        return list(response.generations), response.batch if response.HasField("batch") else None

    def _note_scheduled(self, chunks: list[PrefillChunk]) -> None:
        """The first prefill of these requests starts now: their time in queue ends."""
        now = time.monotonic()
        for chunk in chunks:
            entry = self._entries[chunk.seq.request_id]
            if entry.scheduled is not None:
                continue  # a later chunk, or a recomputation after preemption
            entry.scheduled = now
            entry.spans.scheduled()
            if self._metrics is not None:
                self._metrics.queue_duration.observe(now - entry.submitted)

    def _riders(self, decoding: list[Sequence], chunks: list[PrefillChunk]
                ) -> list[RequestSpans]:
        """The spans of the requests riding in a step, in the step's order."""
        seqs = [*decoding, *(chunk.seq for chunk in chunks)]
        entries = [self._entries.get(seq.request_id) for seq in seqs]
        return [entry.spans for entry in entries if entry is not None]

    def _observe_step(self, method: str, plan: StepPlan,
                      response: generate_pb2.PrefillResponse | generate_pb2.DecodeResponse,
                      started: float) -> None:
        assert self._metrics is not None
        metrics = self._metrics
        metrics.step_duration.labels(method).observe(time.perf_counter() - started)
        metrics.forward_duration.labels(method).observe(response.timings.forward_ns / 1e9)
        metrics.batch_size.labels(method).observe(len(plan.decoding) + len(plan.chunks))
        hits = self._blocks.prefix_hit_tokens_total
        if hits > self._prefix_hits_seen:
            metrics.prefix_hit_tokens.inc(hits - self._prefix_hits_seen)
            self._prefix_hits_seen = hits

    def _request_proto(self, chunk: PrefillChunk) -> generate_pb2.Request:
        seq = chunk.seq
        entry = self._entries[seq.request_id]
        stopping = entry.request.stopping
        end = len(seq.token_ids)
        return generate_pb2.Request(
            id=seq.request_id,
            input_ids=seq.token_ids,
            parameters=entry.parameters,
            stopping_parameters=generate_pb2.StoppingCriteriaParameters(
                max_new_tokens=seq.max_new_tokens - seq.num_generated,
                ignore_eos_token=stopping.ignore_eos_token,
                stop_token_ids=stopping.stop_token_ids),
            blocks=seq.blocks,
            slots=slot_range(seq.blocks, self._block_size, chunk.start, end),
            cache_len=chunk.start,
            chunk_len=0 if chunk.is_last else chunk.length,
            prefill_logprobs=seq.wants_prefill_logprobs,
            top_n_tokens=entry.request.top_n_tokens,
            generated_offset=seq.num_generated,
        )

    async def _abort_step(self, plan: StepPlan, error: Exception) -> None:
        """Fail the request at fault in a failed step; the others go back to the queue
        (Scheduler.abort_step) unless the shards could not answer at all."""
        failed, requeued = self._scheduler.abort_step(plan, isolate=_isolatable(error))
        logger.error("step failed (%d request(s) in it), failing %d%s: %s",
                     len(plan.decoding) + len(plan.chunks), len(failed),
                     f", requeuing {len(requeued)} to isolate the fault" if requeued else "",
                     error)
        for seq in failed:
            self._close(seq.request_id, GenerationError(f"generation failed: {error}"))
        for seq in requeued:
            self._restart(seq)
        if self._metrics is not None:
            self._metrics.step_failures.labels(_status_name(error)).inc()
            self._metrics.fault_requeues.inc(len(requeued))
        if isinstance(error, ShardError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            before = self._scheduler.prefill_budget
            logger.warning("a shard ran out of memory: prefill budget cut from %d to %d tokens "
                           "per step until steps succeed again", before,
                           self._scheduler.out_of_memory())
        self._batch_id = None
        await self._clear_shard_cache()

    def _restart(self, seq: Sequence) -> None:
        """The request went back to the queue: its prompt is computed again."""
        entry = self._entries[seq.request_id]
        entry.prefill_ids.clear()
        entry.prefill_logprobs.clear()

    async def _clear_shard_cache(self) -> None:
        try:
            await self._client.clear_cache()
        except ShardError as error:
            logger.warning("could not clear the shards' cache: %s", error)

    async def _fail_everything(self, reason: str) -> None:
        self._deliver_undelivered()
        for seq in self._scheduler.remove_all():
            self._close(seq.request_id, GenerationError(reason))
        # The shards may hold a batch the router no longer knows.
        self._batch_id = None
        await self._clear_shard_cache()

    # ------------------------------------------------------------------ results to streams

    def _deliver_undelivered(self) -> None:
        """Push the last step's results into the handles (each wakes its stream's task)."""
        generations, self._undelivered = self._undelivered, []
        for generation in generations:
            entry = self._entries.get(generation.request_id)
            if entry is not None:
                self._deliver(generation, entry)

    def _deliver(self, generation: generate_pb2.Generation, entry: _Entry) -> None:
        if generation.prefill_tokens.ids:
            entry.prefill_ids.extend(generation.prefill_tokens.ids)
            entry.prefill_logprobs.extend(generation.prefill_tokens.logprobs)
        ids = generation.tokens.ids
        if not ids:
            return  # a chunk that did not reach the end of the prompt
        if entry.prefill_ids:
            entry.handle._push(PrefillEvent(tuple(entry.prefill_ids),
                                            tuple(entry.prefill_logprobs)))
            entry.prefill_ids, entry.prefill_logprobs = [], []
        finish = _FINISH_REASONS.get(generation.finish_reason)
        logprobs = generation.tokens.logprobs
        for index, token_id in enumerate(ids):
            top = generation.top_tokens[index] if index < len(generation.top_tokens) else None
            entry.handle._push(TokenEvent(
                id=token_id,
                logprob=logprobs[index] if index < len(logprobs) else math.nan,
                top_tokens=tuple(zip(top.ids, top.logprobs)) if top is not None else (),
                finish_reason=finish if index == len(ids) - 1 else None))
        if finish is not None:
            self._close(generation.request_id)

    def _close(self, request_id: int, error: GenerationError | None = None) -> None:
        if error is None:
            entry = self._forget(request_id, "finished")
        else:
            entry = self._forget(request_id, "failed", str(error))
        if entry is not None:
            entry.handle._close(error)

    def _forget(self, request_id: int, end: str, error: str | None = None) -> _Entry | None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            entry.spans.ended(end, error)
        if not self._entries:
            self._drained.set()
        return entry


# Step failures where the shards answered: a request of the step may be at fault (bad
# input, a bug it triggers, memory it needs), and retrying the others may succeed. A shard
# that is unreachable or timed out fails every request at once instead.
_ISOLATABLE_CODES = frozenset({
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
})


def _isolatable(error: Exception) -> bool:
    if isinstance(error, BatchMismatchError):
        return True
    return isinstance(error, ShardError) and error.code in _ISOLATABLE_CODES


def _status_name(error: Exception) -> str:
    if isinstance(error, ShardError):
        return error.code.name if error.code is not None else "NO_STATUS"
    return "BATCH_MISMATCH"


def _failure(seq: Sequence, reason: str, now: float) -> GenerationError:
    """The error of a request the scheduler failed: it passed its deadline (the scheduler
    checks deadlines first), or it can never fit the KV cache."""
    if seq.deadline is not None and now >= seq.deadline:
        return RequestTimeoutError(reason)
    return GenerationError(reason)


def _outcome(generations: list[generate_pb2.Generation]) -> tuple[dict[int, list[int]], set[int]]:
    """The tokens sampled per request and the requests the shard stopped."""
    tokens = {g.request_id: list(g.tokens.ids) for g in generations if g.tokens.ids}
    finished = {g.request_id for g in generations
                if g.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED}
    return tokens, finished


def _log_step(method: str, plan: StepPlan, run_ahead: bool,
              response: generate_pb2.PrefillResponse | generate_pb2.DecodeResponse,
              started: float, planned_s: float) -> None:
    """One debug line per step: what ran, the shard's time, the router's wall time from
    sending to the answer, and its time from the last answer to sending this step."""
    logger.debug("step %s: %d decoding, %d prompt chunk(s) of %d tokens, run ahead %s; "
                 "shard forward %.2f ms, total %.2f ms; router %.2f ms, planned in %.2f ms",
                 method, len(plan.decoding), len(plan.chunks),
                 sum(chunk.length for chunk in plan.chunks), "yes" if run_ahead else "no",
                 response.timings.forward_ns / 1e6, response.timings.total_ns / 1e6,
                 (time.perf_counter() - started) * 1e3, planned_s * 1e3)


def _step_attributes(plan: StepPlan) -> dict[str, int]:
    """What a step span says about the step before it runs."""
    return {engine_spans.BATCH_SIZE: len(plan.decoding) + len(plan.chunks),
            engine_spans.DECODE_REQUESTS: len(plan.decoding),
            engine_spans.PREFILL_REQUESTS: len(plan.chunks),
            engine_spans.PREFILL_TOKENS: sum(chunk.length for chunk in plan.chunks)}
