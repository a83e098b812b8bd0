"""The model runner: composes the model, the KV store, the batches and the sampler.

It implements the batch RPCs on protobuf messages (Warmup, Prefill, Decode, FilterBatch,
ClearCache) and the deep health probe. Every method runs to completion before the next
(the server calls them one at a time). A step first checks everything the router sent,
then computes, and only then commits: a step that fails leaves the cached batches as
they were.

On CUDA a decode step replays a captured graph (shard/cuda_graphs.py); its inputs go up
through pinned memory without blocking, its sampled ids stay on the device as the next
step's inputs, and its results come back in non-blocking copies that the host waits for
only when it builds the answer.

Run-ahead (generate.proto, RunAhead): when the router asks, the runner launches the next
step right behind the current one, before it waits for the current results, so the device
never idles while the host commits, answers and hears the next call. That step decodes the
running requests and computes the prompt chunks the router sent along (`next_requests`).
The next Prefill or Decode adopts it when it names the same new requests and the same
running ones (or some) at the same lengths; anything else discards it. Penalty statistics
are observed on the device when a step is launched (or adopted), so a step ahead sees the
tokens of the step before it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opentelemetry import trace

from shardgen.common.tracing import optional_span
from shardgen.proto import generate_pb2
from shardgen.shard.batch import CacheLimits, DecodeBatch, NewSequence, StepInputs, build_step
from shardgen.shard.cuda_graphs import DecodeGraphs, GraphPolicy, PrefillGraphs, bucket_sizes
from shardgen.shard.interceptor import BatchNotFoundError, CapacityError, NotReadyError
from shardgen.shard.kv_cache import KVCacheSpec, PagedKVCache
from shardgen.shard.layers.attention import AttentionMetadata
from shardgen.shard.models import CausalLM
from shardgen.shard.outputs import (
    RUNNING,
    StepOutput,
    build_generations,
    finished_rows,
    prompt_logprobs,
)
from shardgen.shard.sampling import SampleOutput, SamplingBatch, SamplingParams, sample
from shardgen.shard.transfers import HostCopy, PinnedUpload, device_tensor
from shardgen.shard.step_timing import DeviceSpan, StepTimeline
from shardgen.shard.warmup import (
    WarmupShape,
    cuda_num_blocks,
    gemm_row_counts,
    graph_reserve_bytes,
    required_blocks,
    warm_projections,
)

logger = logging.getLogger(__name__)
# A step's spans (children of the RPC's span; no-ops with tracing off): see _step.
_tracer = trace.get_tracer("shardgen.shard")


@dataclass(frozen=True)
class ModelFacts:
    """What the runner and Info need to know about the loaded model."""

    architecture: str
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def read(cls, model_path: str | Path, model: CausalLM) -> ModelFacts:
        """From the model's config and the folder's generation_config.json (EOS ids of
        both count: e.g. a model that also stops on BOS lists it only there)."""
        config = model.config
        eos = _as_ids(getattr(config, "eos_token_id", None))
        generation_config = Path(model_path) / "generation_config.json"
        if generation_config.is_file():
            eos += _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
        return cls(
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            vocab_size=model.vocab_size,
            max_positions=int(config.max_position_embeddings),
            eos_token_ids=tuple(sorted(set(eos))))


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


@dataclass(frozen=True)
class MemoryPolicy:
    """How Warmup sizes the KV cache (see shard/warmup.py)."""

    block_size: int
    kv_cache_bytes: int
    num_blocks: int | None
    cuda_memory_fraction: float


@dataclass(eq=False)
class _AheadStep:
    """A step launched before the router asked for it (run-ahead).

    `batch` is its sampling rows (the running rows as the step before leaves them, then the
    new requests that finish their prompt; None when no row samples), `new` the identity of
    its new requests (`_new_key`); `picked` its sampler output on the device, `results` the
    same on its way to the host.
    """

    batch: DecodeBatch | None
    new: tuple[tuple[object, ...], ...]
    picked: SampleOutput | None
    results: HostCopy | None
    launched_ns: int
    span: DeviceSpan | None = None

    def rows_for(self, batch: DecodeBatch | None, new: Sequence[NewSequence]) -> list[int] | None:
        """This step's rows of `batch`'s requests, in `batch`'s order; None unless the step
        computed exactly `new` and every request of `batch` at the same length (then it is
        the step asked for; rows it has beyond those are dropped)."""
        if _new_key(new) != self.new:
            return None
        if batch is None:
            return []
        if self.batch is None:
            return None
        index = {rid: row for row, rid in enumerate(self.batch.request_ids)}
        try:
            rows = [index[rid] for rid in batch.request_ids]
        except KeyError:
            return None
        if not np.array_equal(self.batch.seq_lens[rows], batch.seq_lens):
            return None
        return rows

    def mismatch(self, batch: DecodeBatch | None, new: Sequence[NewSequence]) -> str:
        """Why `rows_for` found no rows (for the debug log)."""
        key = _new_key(new)
        if key != self.new:
            return (f"it computed new requests {[k[:3] for k in self.new]}, the call has "
                    f"{[k[:3] for k in key]}")
        ids = set(batch.request_ids) if batch is not None else set()
        return (f"the call's sampling rows {sorted(ids)[:8]}... are not among its "
                f"{sorted(self.batch.request_ids)[:8] if self.batch is not None else []}... "
                f"at the same lengths")


def _new_key(new: Sequence[NewSequence]) -> tuple[tuple[object, ...], ...]:
    """What makes two calls' new requests the same computation."""
    return tuple((s.request_id, s.start, s.end, len(s.input_ids), tuple(s.blocks)) for s in new)


class ModelRunner:
    """One shard's model and state. Not thread-safe: call one method at a time (a step
    run ahead is launched on a thread of the runner's own, joined before anything else).

    `graphs` says whether Warmup captures decode CUDA graphs; None picks the default
    (GraphPolicy.default_for: on for one CUDA rank with graph-safe ops). `kv_cache_dtype`
    is what the KV cache stores (None: the model's `dtype`; float8_e4m3fn halves it).
    """

    def __init__(self, model: CausalLM, facts: ModelFacts, memory: MemoryPolicy, *,
                 device: torch.device, dtype: torch.dtype, rank: int = 0,
                 graphs: GraphPolicy | None = None, run_ahead: bool | None = None,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.dtype = dtype
        self.facts = facts
        self.memory = memory
        self.device = device
        self.rank = rank
        self.spec = KVCacheSpec(model.num_layers, memory.block_size, model.num_kv_heads,
                                model.head_dim, kv_cache_dtype or dtype)
        self.cache: PagedKVCache | None = None
        self.batches: dict[int, DecodeBatch] = {}
        self.eos_token_ids = frozenset(facts.eos_token_ids)
        self.graph_policy = graphs if graphs is not None else GraphPolicy.default_for(model, device)
        if self.graph_policy.enabled and not (device.type == "cuda" and model.ops.graph_safe):
            raise ValueError(f"CUDA graphs need a CUDA device and the Triton kernels, got {device.type} "
                             f"with the {model.ops.name} ops")
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self._upload = PinnedUpload(device)
        self._timeline = StepTimeline(device, logger)
        # Honour run_ahead requests (None: where launches overlap the host, i.e. on CUDA).
        self.run_ahead = device.type == "cuda" if run_ahead is None else run_ahead
        # The step ahead, being launched on its own thread: a launch can stall on a busy
        # device (a full launch queue), and the answer of the step before must not wait.
        self._ahead: Future[_AheadStep | None] | None = None
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-launch",
                                            initializer=self.bind_thread) if self.run_ahead else None
        # Steps run ahead: launched, adopted by the next call (with prompts: a Prefill),
        # discarded, failed to launch (tests, logs).
        self.run_ahead_counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ warm-up, health

    def bind_thread(self) -> None:
        """Make this rank's device the calling thread's current one (CUDA's current device
        is per thread; Triton launches on it)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @torch.inference_mode()
    def warmup(self, request: generate_pb2.WarmupRequest) -> generate_pb2.WarmupResponse:
        """Run the largest step, allocate the KV cache, capture the decode graphs; forgets
        every batch."""
        self.batches.clear()
        self._discard_ahead()
        self.graphs = self.prefill_graphs = None  # they hold the old cache: release all before measuring
        self.cache = None
        shape = WarmupShape.of(request.max_batch_prefill_tokens, request.max_batch_size,
                               request.max_total_tokens, self.facts.max_positions)
        if request.max_total_tokens > self.facts.max_positions:
            logger.warning("max_total_tokens %d exceeds the model's %d positions; longer "
                           "sequences will be rejected", request.max_total_tokens,
                           self.facts.max_positions)
        graph_batch = min(request.max_batch_size, self.graph_policy.max_batch_size)
        # A varlen step holds at most the prefill budget plus one token per running request.
        graph_tokens = min(self.graph_policy.max_prefill_tokens,
                           request.max_batch_prefill_tokens + request.max_batch_size)
        num_blocks = self._measure_num_blocks(shape, graph_batch, graph_tokens, request.max_batch_size,
                                              request.max_batch_prefill_tokens)
        needed = required_blocks(request.max_total_tokens, self.spec.block_size)
        if self.memory.num_blocks is not None:
            num_blocks = self.memory.num_blocks
            if num_blocks < needed:
                logger.warning("--num-blocks %d holds fewer than the %d blocks of one sequence "
                               "of max_total_tokens %d", num_blocks, needed, request.max_total_tokens)
        elif num_blocks < needed and request.max_total_tokens_may_shrink:
            logger.info("the KV cache holds %d blocks of %d tokens: one sequence may hold %d "
                        "tokens, not max_total_tokens %d", num_blocks, self.spec.block_size,
                        (num_blocks - 1) * self.spec.block_size, request.max_total_tokens)
        elif num_blocks < needed:
            raise CapacityError(
                f"the KV cache fits {num_blocks} blocks of {self.spec.block_size} tokens, fewer "
                f"than the {needed} that one sequence of max_total_tokens "
                f"{request.max_total_tokens} needs: lower max_total_tokens or give the shard "
                f"more memory")
        self.cache = PagedKVCache(self.spec, num_blocks, self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB of %s)", num_blocks,
                    self.spec.block_size, self.cache.nbytes / 2**20,
                    str(self.spec.dtype).removeprefix("torch."))
        if self.graph_policy.enabled:
            # No sequence holds more blocks than the cache has.
            table_width = min(needed, num_blocks)
            pool = torch.cuda.graph_pool_handle()
            self.graphs = DecodeGraphs.capture(self.model, self.cache, graph_batch, table_width, pool)
            if graph_tokens:
                self.prefill_graphs = PrefillGraphs.capture(self.model, self.cache, graph_tokens,
                                                            request.max_batch_size, table_width, pool)
        return generate_pb2.WarmupResponse(num_blocks=num_blocks, block_size=self.spec.block_size)

    def _load_kernels(self, max_rows: int, prefill_tokens: int) -> None:
        """Run the GEMMs and the sampler at every size a step may give them, so that no step
        meets a kernel for the first time while serving.

        cuBLAS picks a different kernel for many row counts and loads each at its first use,
        and the load waits until the device has run everything queued: while serving, the
        launch of the step ahead then stalls until the device drains, which idled it ~10 ms
        before each prefill step of a 256-request load, the LM head meeting a new row count
        every step (CUDA_MODULE_LOADING=EAGER does not change it; benchmark/NOTES.md, ninth
        pass). Triton compiles a kernel's variant at its first launch with new constants
        (the greedy pick's split count follows the row count; a fresh H100 paid ~1 s at a
        first request). So: every projection at each row count of `gemm_row_counts`, the LM
        head and the greedy pick at every row count, a sampled pick at each bucket size.
        """
        started = time.perf_counter()
        counts = gemm_row_counts(max_rows, prefill_tokens)
        distinct = warm_projections(self.model, counts, self.dtype)
        vocab_size = self.facts.vocab_size
        hidden = torch.zeros((max_rows, self.model.config.hidden_size), dtype=self.dtype, device=self.device)
        index = torch.zeros(max_rows, dtype=torch.int64, device=self.device)
        buckets = set(bucket_sizes(max_rows))
        greedy, sampled = SamplingParams(), SamplingParams(do_sample=True, top_k=50, top_p=0.9)
        for rows in range(1, max_rows + 1):
            logits = self.model.compute_logits(hidden[:rows])
            for params in (greedy, sampled) if rows in buckets else (greedy,):
                sample(logits, SamplingBatch([params] * rows, vocab_size, self.device), index[:rows], index[:rows])
        torch.cuda.synchronize(self.device)
        logger.info("warm-up: ran %d distinct projections at %d row counts (1-%d, %d-%d), the LM head and "
                    "sampler at 1-%d rows, in %.1f s", distinct, len(counts), max_rows, prefill_tokens,
                    prefill_tokens + max_rows, max_rows, time.perf_counter() - started)

    def _measure_num_blocks(self, shape: WarmupShape, graph_batch: int, graph_tokens: int,
                            max_rows: int, prefill_tokens: int) -> int:
        """Run the warm-up step on a temporary cache; blocks the real one may have (leaving
        room for the decode graphs of up to `graph_batch` rows and the varlen graphs of up
        to `graph_tokens` tokens when they are on). On CUDA the kernels that steps of up to
        `max_rows` rows and `prefill_tokens` prompt tokens meet are loaded before measuring,
        so that the memory they take counts."""
        is_cuda = self.device.type == "cuda"
        if is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        temporary = PagedKVCache(self.spec, shape.blocks_needed(self.spec.block_size), self.device)
        sequences = shape.sequences(self.spec.block_size, self.facts.vocab_size)
        sampled = DecodeBatch.from_new(0, sequences, self.facts.vocab_size, self.device)
        self._compute(temporary, build_step(None, sequences, self.spec.block_size, self.device,
                                            sampled=sampled), sampled)
        if not is_cuda:
            return self.spec.blocks_for_bytes(self.memory.kv_cache_bytes)
        self._load_kernels(max_rows, prefill_tokens)
        config = self.model.config
        reserve = graph_reserve_bytes(graph_batch, self.facts.vocab_size, config.hidden_size, graph_tokens,
                                      getattr(config, "intermediate_size", 4 * config.hidden_size)) \
            if self.graph_policy.enabled else 0
        num_blocks = cuda_num_blocks(self.spec, self.device, self.memory.cuda_memory_fraction,
                                     temporary.nbytes, reserve)
        del temporary
        torch.cuda.empty_cache()
        return num_blocks

    @torch.inference_mode()
    def health(self, deep: bool) -> None:
        """A deep probe runs one token at position 0 into block 0 (reserved for this)."""
        if not deep:
            return
        cache = self.cache or PagedKVCache(self.spec, 1, self.device)
        one = torch.zeros(1, dtype=torch.int64, device=self.device)
        attn = AttentionMetadata(
            slot_mapping=one, block_tables=torch.zeros((1, 1), dtype=torch.int32, device=self.device),
            seq_lens=torch.ones(1, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=self.device),
            max_seqlen_q=1, max_seqlen_k=1)
        hidden = self.model(one, one, cache.layers, attn)
        if not torch.isfinite(self.model.compute_logits(hidden)).all():
            raise RuntimeError("the health probe's logits are not finite")

    # ------------------------------------------------------------------ batch state

    def clear_cache(self, batch_id: int | None) -> None:
        """Forget one cached batch (unknown ids are ignored), or all of them; and any step
        run ahead."""
        self._discard_ahead()
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def filter_batch(self, request: generate_pb2.FilterBatchRequest) -> generate_pb2.CachedBatch:
        """Keep only `request_ids` of a cached batch, in that order."""
        batch = self._batch(request.batch_id)
        rows = {rid: r for r, rid in enumerate(batch.request_ids)}
        if len(set(request.request_ids)) != len(request.request_ids):
            raise ValueError(f"request ids repeat: {list(request.request_ids)}")
        unknown = [rid for rid in request.request_ids if rid not in rows]
        if unknown:
            raise ValueError(f"requests {unknown} are not in batch {request.batch_id} "
                             f"(it holds {batch.request_ids})")
        kept = batch.select([rows[rid] for rid in request.request_ids])
        self._store(kept)
        return generate_pb2.CachedBatch(id=kept.batch_id, request_ids=kept.request_ids)

    def _take_ahead(self) -> _AheadStep | None:
        """The step ahead, once its launch is done (None if there is none)."""
        future, self._ahead = self._ahead, None
        return future.result() if future is not None else None

    def _discard_ahead(self) -> None:
        if self._take_ahead() is not None:
            self.run_ahead_counts["discarded"] += 1

    def _batch(self, batch_id: int) -> DecodeBatch:
        try:
            return self.batches[batch_id]
        except KeyError:
            raise BatchNotFoundError(
                f"batch {batch_id} is not cached on this shard (cached: {sorted(self.batches)})"
            ) from None

    def _running(self, cached: Sequence[generate_pb2.CachedBatch]) -> list[DecodeBatch]:
        """The stored batches the router names, checked against its view of them."""
        ids = [message.id for message in cached]
        if len(set(ids)) != len(ids):
            raise ValueError(f"cached batch ids repeat: {ids}")
        batches = []
        for message in cached:
            batch = self._batch(message.id)
            if list(message.request_ids) != batch.request_ids:
                raise ValueError(f"batch {message.id} holds requests {batch.request_ids}, the "
                                 f"router sent {list(message.request_ids)}")
            batches.append(batch)
        return batches

    def _store(self, batch: DecodeBatch | None, replaced: Sequence[int] = ()) -> None:
        for batch_id in replaced:
            self.batches.pop(batch_id, None)
        if batch is not None:
            if len(batch):
                self.batches[batch.batch_id] = batch
            else:
                self.batches.pop(batch.batch_id, None)

    # ------------------------------------------------------------------ steps

    @torch.inference_mode()
    def prefill(self, request: generate_pb2.PrefillRequest) -> generate_pb2.PrefillResponse:
        """New requests (whole prompts or chunks) plus one token of the cached batch."""
        started = time.perf_counter_ns()
        cache, limits = self._ready()
        cached = [request.cached_batch] if request.HasField("cached_batch") else []
        running = self._running(cached)
        new = [NewSequence.from_proto(r, limits) for r in request.batch.requests]
        if not new and not running:
            raise ValueError("Prefill needs at least one request or a cached batch")
        self._check_new_ids(new)
        output = self._step(cache, limits, running, new, request.block_extensions,
                            request.batch.id, request.run_ahead, request.next_requests)
        self._store(output.batch, replaced=[b.batch_id for b in running])
        return generate_pb2.PrefillResponse(
            generations=output.generations, batch=_cached(output.batch),
            timings=_timings(output.forward_ns, started))

    @torch.inference_mode()
    def decode(self, request: generate_pb2.DecodeRequest) -> generate_pb2.DecodeResponse:
        """One token for every request of the named cached batches, merged into one."""
        started = time.perf_counter_ns()
        cache, limits = self._ready()
        if not request.batches:
            raise ValueError("Decode needs at least one cached batch")
        running = self._running(request.batches)
        output = self._step(cache, limits, running, [], request.block_extensions,
                            request.batches[0].id, request.run_ahead, request.next_requests)
        self._store(output.batch, replaced=[b.batch_id for b in running])
        return generate_pb2.DecodeResponse(
            generations=output.generations, batch=_cached(output.batch),
            timings=_timings(output.forward_ns, started))

    def _ready(self) -> tuple[PagedKVCache, CacheLimits]:
        if self.cache is None:
            raise NotReadyError("the KV cache is not allocated: call Warmup before Prefill or Decode")
        return self.cache, CacheLimits(self.spec.block_size, self.cache.num_blocks,
                                       self.facts.vocab_size, self.facts.max_positions)

    def _check_new_ids(self, new: Sequence[NewSequence]) -> None:
        """A request id is in at most one place: the new batch or one cached batch."""
        ids = [s.request_id for s in new]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids repeat within the batch: {ids}")
        active = {rid for b in self.batches.values() for rid in b.request_ids}
        clash = sorted(active.intersection(ids))
        if clash:
            raise ValueError(f"requests {clash} are already decoding on this shard")

    def _step(self, cache: PagedKVCache, limits: CacheLimits, running: list[DecodeBatch],
              new: list[NewSequence], extensions: Sequence[generate_pb2.BlockTableExtension],
              batch_id: int, run_ahead: bool,
              next_requests: Sequence[generate_pb2.Request] = ()) -> StepOutput:
        """Check and lay out, compute (or adopt the step run ahead), then commit one step.

        Spans: `kv_write` lays out where the step's keys and values go (the router's block
        extensions applied, each new token's slot computed, the slot mapping sent to the
        device; the element writes run in each attention layer, inside `forward`), then
        `forward` and `sampling` (in _compute), and `run_ahead` around the next step's launch.
        """
        ahead = self._take_ahead()
        marks = [time.perf_counter_ns()]
        with optional_span(_tracer, "kv_write") as span:
            extended = _extend(running, extensions, limits)
            decoding = DecodeBatch.concat(batch_id, extended) if extended else None
            sampled = self._sampling_rows(batch_id, decoding, new, limits)
            adopted = ahead.rows_for(sampled, new) if ahead is not None else None
            if adopted is None:
                inputs = build_step(decoding, new, limits.block_size, self.device, sampled=sampled,
                                    upload=self._upload)
            if span.is_recording():
                span.set_attributes({
                    "shardgen.kv.slots": len(sampled or ()) if adopted is not None
                    else int(inputs.attn.slot_mapping.shape[0]),
                    "shardgen.kv.blocks_extended": sum(len(e.blocks) for e in extensions),
                    "shardgen.run_ahead.adopted": adopted is not None})
        if ahead is not None:
            self.run_ahead_counts["adopted" if adopted is not None else "discarded"] += 1
            if adopted is not None and new:
                self.run_ahead_counts["adopted with prompts"] += 1
            if adopted is None and logger.isEnabledFor(logging.DEBUG):
                logger.debug("discarded the step run ahead: %s", ahead.mismatch(sampled, new))
        prompt: dict[int, generate_pb2.Tokens] = {}
        picked: SampleOutput | None = None
        results: HostCopy | None = None
        if adopted is not None:
            assert ahead is not None
            forward_started, device_span = ahead.launched_ns, ahead.span
            if sampled is not None:
                assert ahead.picked is not None and ahead.results is not None
                picked, results = _select_rows(ahead.picked, adopted), ahead.results
        else:
            forward_started = time.perf_counter_ns()
            device_span = self._timeline.begin()
            hidden, picked = self._compute(cache, inputs, sampled)
            self._timeline.end(device_span)
            # Queued behind the sampler; prompt log-probabilities (prefill only) run meanwhile.
            results = HostCopy(*_fields(picked)) if picked is not None else None
            prompt = prompt_logprobs(new, inputs.prefill_spans, hidden, self.model.compute_logits)
            del hidden
        if sampled is not None and picked is not None:
            sampled.sampling.observe(picked.next_ids)   # before any step after this one
        marks.append(time.perf_counter_ns())
        if run_ahead and self.run_ahead:
            self._ahead = self._launch_ahead(cache, limits, sampled, picked, next_requests, batch_id)
        marks.append(time.perf_counter_ns())
        on_host = None
        if results is not None:
            on_host = SampleOutput(*results.wait())
            if adopted is not None:
                on_host = _select_rows(on_host, adopted)
        marks.append(time.perf_counter_ns())
        forward_ns = marks[-1] - forward_started
        batch, generations = self._commit(sampled, picked, on_host, new, prompt,
                                          limits.max_positions)
        if logger.isEnabledFor(logging.DEBUG):
            marks.append(time.perf_counter_ns())
            logger.debug("step of %d rows and %d prompts: %s %.2f ms, next step launched in %.2f "
                         "ms, results waited %.2f ms, committed in %.2f ms; %s",
                         len(sampled or ()), len(new), "adopted in" if adopted is not None else
                         "laid out and launched in", *(np.diff(marks) / 1e6),
                         device_span.describe() if device_span is not None else "device not timed")
        return StepOutput(batch, generations, forward_ns)

    def _sampling_rows(self, batch_id: int, running: DecodeBatch | None,
                       new: Sequence[NewSequence], limits: CacheLimits) -> DecodeBatch | None:
        """The rows of a step that pick a token: the running ones, then the new requests
        that finish their prompt; None when there are none."""
        finishing = [s for s in new if s.finishes_prompt]
        parts = ([running] if running is not None else []) + (
            [DecodeBatch.from_new(batch_id, finishing, limits.vocab_size, self.device)]
            if finishing else [])
        return DecodeBatch.concat(batch_id, parts) if parts else None

    def _launch_ahead(self, cache: PagedKVCache, limits: CacheLimits, sampled: DecodeBatch | None,
                      picked: SampleOutput | None, next_requests: Sequence[generate_pb2.Request],
                      batch_id: int) -> Future[_AheadStep | None] | None:
        """Start launching the step after the one just queued: its rows fed the tokens it is
        sampling (still on the device), and the prompt chunks of `next_requests`. Its rows are
        laid out here (the commit of the step before changes `sampled` next), its kernels
        launched on the launch thread. None when nothing can run: no row goes on (all stop on
        length) and no chunk was sent, some row lacks the block of its next position, or a
        chunk is invalid or wants prompt log-probabilities (the call that asks for it then
        computes it, and fails it if need be)."""
        assert self._launcher is not None
        running = None
        if sampled is not None and picked is not None:
            rows = sampled.continuing_rows(limits.max_positions)
            running = sampled.successor(rows, picked.next_ids) if rows else None
        if running is not None and not running.has_next_slots(limits.block_size):
            logger.debug("not running ahead: a request lacks the block of its next position")
            return None
        try:
            new = [NewSequence.from_proto(request, limits) for request in next_requests]
        except ValueError as error:
            logger.debug("not running ahead: %s", error)
            return None
        ids = [s.request_id for s in new] + (running.request_ids if running is not None else [])
        if len(set(ids)) != len(ids) or any(s.prefill_logprobs for s in new):
            return None
        if running is None and not new:
            return None
        batch = self._sampling_rows(batch_id, running, new, limits)
        self.run_ahead_counts["launched"] += 1
        return self._launcher.submit(contextvars.copy_context().run, self._launch, cache, limits,
                                     running, new, batch)

    def _launch(self, cache: PagedKVCache, limits: CacheLimits, running: DecodeBatch | None,
                new: list[NewSequence], batch: DecodeBatch | None) -> _AheadStep | None:
        """On the launch thread: lay out and launch the step ahead. A failure is logged and
        leaves no step ahead (the next call computes its step, and meets the error if it
        lasts)."""
        try:
            with torch.inference_mode(), optional_span(_tracer, "run_ahead") as span:
                if span.is_recording():
                    span.set_attributes({"shardgen.batch.size": len(batch or ()),
                                         "shardgen.prefill.requests": len(new)})
                inputs = build_step(running, new, limits.block_size, self.device, sampled=batch,
                                    upload=self._upload)
                launched = time.perf_counter_ns()
                device_span = self._timeline.begin()
                _, picked = self._compute(cache, inputs, batch)
                self._timeline.end(device_span)
                return _AheadStep(batch, _new_key(new), picked,
                                  HostCopy(*_fields(picked)) if picked is not None else None,
                                  launched, device_span)
        except Exception:
            logger.exception("launching the step ahead failed; the next call computes its own")
            self.run_ahead_counts["failed"] += 1
            return None

    def _commit(self, sampled: DecodeBatch | None, picked: SampleOutput | None,
                on_host: SampleOutput | None, new: Sequence[NewSequence],
                prompt: dict[int, generate_pb2.Tokens], max_positions: int
                ) -> tuple[DecodeBatch | None, list[generate_pb2.Generation]]:
        """Advance the sampled rows, drop those that stopped, and (rank 0) say what happened.

        `picked` is the sampler's output on the device, `on_host` the same on the host.
        Nothing here depends on what the router sent: a step that got this far succeeds.
        """
        generations: list[generate_pb2.Generation] = []
        if sampled is not None and picked is not None and on_host is not None:
            next_ids = on_host.next_ids.numpy()
            sampled.advance(next_ids, picked.next_ids)
            finished = finished_rows(sampled, next_ids, self.eos_token_ids, max_positions)
            if self.rank == 0:
                generations = build_generations(sampled, on_host, next_ids, finished, prompt)
            if finished.any():
                sampled = sampled.select(np.flatnonzero(finished == RUNNING).tolist())
        if self.rank == 0:
            # A chunk that does not end its prompt samples nothing; it still gets an answer.
            generations += [generate_pb2.Generation(request_id=s.request_id,
                                                    prefill_tokens=prompt.get(s.request_id))
                            for s in new if not s.finishes_prompt]
        return sampled, generations

    def _compute(self, cache: PagedKVCache, inputs: StepInputs, sampled: DecodeBatch | None
                 ) -> tuple[torch.Tensor, SampleOutput | None]:
        """The forward pass (a graph replay when the step fits one), and the pick of the
        rows that sample.

        Spans: `forward` (the model and the logits of the sampling rows) and `sampling`.
        On CUDA both time the host's launch of the work; the RPC's span ends after the
        results reach the host.
        """
        decode = self.graphs if self.graphs is not None and sampled is not None else None
        bucket = decode.bucket_for(inputs) if decode is not None else None
        varlen = self.prefill_graphs if bucket is None else None
        varlen_bucket = varlen.bucket_for(inputs) if varlen is not None else None
        with optional_span(_tracer, "forward") as span:
            if span.is_recording():
                span.set_attributes({"shardgen.tokens": int(inputs.input_ids.shape[0]),
                                     "shardgen.cuda_graph": bucket is not None or varlen_bucket is not None})
            if decode is not None and bucket is not None:
                hidden, logits = decode.replay(inputs, bucket)
            else:
                hidden = varlen.replay(inputs, varlen_bucket) if varlen is not None and varlen_bucket is not None \
                    else self.model(inputs.input_ids, inputs.positions, cache.layers, inputs.attn)
                if sampled is None:
                    return hidden, None
                logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))
        with optional_span(_tracer, "sampling") as span:
            if span.is_recording():
                span.set_attribute("shardgen.batch.size", len(sampled))
            picked = sample(logits, sampled.sampling, inputs.draw_index, inputs.previous_tokens,
                            top_n=max(sampled.top_n_tokens))
        return hidden, picked


def _fields(picked: SampleOutput) -> list[torch.Tensor]:
    return [picked.next_ids, picked.logprobs, picked.top_ids, picked.top_logprobs]


def _select_rows(output: SampleOutput, rows: list[int]) -> SampleOutput:
    """The outputs of `rows`, on the device or the host; all rows in order need no copy."""
    if rows == list(range(output.next_ids.shape[0])):
        return output
    index = device_tensor(rows, torch.int64, output.next_ids.device)
    return SampleOutput(*(field.index_select(0, index) for field in _fields(output)))


def _extend(running: list[DecodeBatch], extensions: Sequence[generate_pb2.BlockTableExtension],
            limits: CacheLimits) -> list[DecodeBatch]:
    """The running batches with the router's new blocks appended (new objects)."""
    blocks: dict[int, list[int]] = {}
    for extension in extensions:
        blocks.setdefault(extension.request_id, []).extend(extension.blocks)
    known = {rid for b in running for rid in b.request_ids}
    unknown = sorted(set(blocks) - known)
    if unknown:
        raise ValueError(f"block_extensions name requests {unknown} that are not in the "
                         f"batches of this step")
    return [b.with_extensions(blocks, limits) for b in running]


def _cached(batch: DecodeBatch | None) -> generate_pb2.CachedBatch | None:
    if batch is None or not len(batch):
        return None
    return generate_pb2.CachedBatch(id=batch.batch_id, request_ids=batch.request_ids)


def _timings(forward_ns: int, started_ns: int) -> generate_pb2.StepTimings:
    return generate_pb2.StepTimings(forward_ns=forward_ns,
                                    total_ns=time.perf_counter_ns() - started_ns)
