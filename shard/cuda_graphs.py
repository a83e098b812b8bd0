"""CUDA graphs of the steps: decode steps (forward and logits) at bucketed batch sizes, and
small varlen steps (prompts, chunks, decodes mixed in; forward only) at bucketed token counts.

A decode-shaped step (one query token per sequence, every row sampling) of B rows
replays the graph of the smallest captured bucket N >= B, which removes the launch cost
of a few hundred kernels per step. The step's inputs are copied into static buffers;
rows B..N-1 are padding: they write their K/V to slot 0 (block 0, reserved for this by
the contract) and have seq_len 0, for which the attention kernel outputs zeros. Their
logits are computed and never read.

Graphs are captured after the KV cache is allocated (they hold its addresses), largest
bucket first, in one memory pool that the smaller ones reuse. What `replay` returns are
views of graph-owned memory: valid until the next replay.

Only ops that never read a device value on the host can be captured (`Ops.graph_safe`:
the Triton set). A block table wider than the captured one falls back to eager.

Varlen steps (`PrefillGraphs`). An eager step launches some 370 kernels through Python
(Triton's dispatch, cuBLAS); below ~1K tokens their device time is shorter than that
host work, so the device waits (a 1K-token prefill of an 8B model: 22 ms of kernels,
~38 ms of wall time on an H100). A step of n tokens and b sequences replays the graph of
the smallest token bucket N >= n, captured with min(N, max sequences) sequence slots: the
n real tokens come first, tokens n..N-1 are padding (slot 0, owned by no sequence: the
attention writes zeros for them and nothing reads them), sequence slots b.. are empty (no
query token, seq_len 0). The attention kernel's launch depends only on those shapes.
The graph ends at the hidden states; the logits of the rows that sample, and prompt
log-probabilities, run eagerly on its output (a few launches). Both kinds share one
memory pool: replays run one at a time on one stream, and each step reads its graph's
outputs before the next replay is queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from shardgen.shard.batch import StepInputs
from shardgen.shard.kv_cache import PagedKVCache
from shardgen.shard.layers.attention import AttentionMetadata
from shardgen.shard.models import CausalLM

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_BATCH_SIZE = 256
# Varlen steps up to this many tokens replay graphs; longer ones keep the device busier
# than their launches keep the host. 2048, not 1024: a burst of prompts whose prefix is
# cached (a few hundred new tokens each) often sums to 1-2K tokens, and eagerly such a
# step waited on ~35 ms of launches (H100, 8B).
DEFAULT_MAX_PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class GraphPolicy:
    """Whether to capture graphs: decode steps of up to `max_batch_size` rows, varlen steps
    of up to `max_prefill_tokens` tokens (0: none)."""

    enabled: bool
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"the CUDA-graph max batch size must be at least 1, got {self.max_batch_size}")
        if self.max_prefill_tokens < 0:
            raise ValueError(f"the CUDA-graph max prefill tokens must be >= 0, got {self.max_prefill_tokens}")

    @classmethod
    def default_for(cls, model: CausalLM, device: torch.device) -> GraphPolicy:
        """On for a single-rank CUDA model built with graph-safe ops.

        Several ranks stay eager unless asked: capturing NCCL collectives has not been
        checked on this code's GPUs yet.
        """
        return cls(enabled=device.type == "cuda" and model.ops.graph_safe and model.tp.world_size == 1)


def _record(forward: Callable[[], T], pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, T]:
    """A graph of `forward` (in `pool`) and the outputs its replays write. An eager run
    first compiles the Triton kernels and sets up cuBLAS outside the capture."""
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = forward()
    return graph, outputs


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def token_bucket_sizes(max_tokens: int, smallest: int = 16) -> list[int]:
    """16, 24, 32, 48, 64, 96, ...: powers of two and 1.5 times them (a step pads by a third
    at most), below max_tokens, then max_tokens itself; none when max_tokens < smallest."""
    if max_tokens < smallest:
        return []
    sizes = []
    size = smallest
    while size < max_tokens:
        sizes.append(size)
        if size * 3 // 2 < max_tokens:
            sizes.append(size * 3 // 2)
        size *= 2
    return sizes + [max_tokens]


class _StaticInputs:
    """The graph's input buffers for max_rows rows, and their views for n rows."""

    def __init__(self, max_rows: int, table_width: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_rows, table_width), dtype=torch.int32, device=device)
        # One query token per row, fixed: the decode kernel never reads it, the contract needs it.
        self.cu_seqlens_q = torch.arange(max_rows + 1, dtype=torch.int32, device=device)

    def attention(self, rows: int, block_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], block_tables=self.block_tables[:rows],
            seq_lens=self.seq_lens[:rows], cu_seqlens_q=self.cu_seqlens_q[:rows + 1],
            max_seqlen_q=1, max_seqlen_k=self.block_tables.shape[1] * block_size)

    def fill(self, inputs: StepInputs, bucket: int) -> None:
        """Copy a step's B rows in; rows B..bucket-1 become padding (slot 0, seq_len 0)."""
        rows = inputs.input_ids.shape[0]
        attn = inputs.attn
        self.input_ids[:rows].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:rows].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:rows].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:rows].copy_(attn.seq_lens, non_blocking=True)
        self.block_tables[:rows, :attn.block_tables.shape[1]].copy_(attn.block_tables, non_blocking=True)
        if rows < bucket:
            # A padding row may hold a real row of an earlier, larger step: without this,
            # it would write that row's K/V again into a slot the router may have reused.
            self.slot_mapping[rows:bucket].zero_()
            self.seq_lens[rows:bucket].zero_()


class DecodeGraphs:
    """Captured decode steps of one model over one KV cache. Not thread-safe."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, max_batch_size: int, table_width: int) -> None:
        self.model = model
        self.cache = cache
        self.table_width = table_width
        self.buckets = bucket_sizes(max_batch_size)
        device = cache.layers[0][0].device
        self._static = _StaticInputs(self.buckets[-1], table_width, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def capture(cls, model: CausalLM, cache: PagedKVCache, max_batch_size: int,
                table_width: int, pool: tuple[int, int] | None = None) -> DecodeGraphs:
        """Capture every bucket up to max_batch_size for block tables up to table_width (in
        `pool`, or a new one)."""
        started = time.perf_counter()
        graphs = cls(model, cache, max_batch_size, table_width)
        pool = pool or torch.cuda.graph_pool_handle()
        for bucket in reversed(graphs.buckets):
            graphs._capture(bucket, pool)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s (block tables up to %d blocks) "
                    "in %.1f s", graphs.buckets, table_width, time.perf_counter() - started)
        return graphs

    def _forward(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._static
        hidden = self.model(s.input_ids[:rows], s.positions[:rows], self.cache.layers,
                            s.attention(rows, self.cache.block_size))
        return hidden, self.model.compute_logits(hidden)

    def _capture(self, rows: int, pool: tuple[int, int]) -> None:
        graph, (hidden, logits) = _record(lambda: self._forward(rows), pool)
        self._graphs[rows] = (graph, hidden, logits)

    def bucket_for(self, inputs: StepInputs) -> int | None:
        """The bucket that replays this step, or None when it must run eagerly.

        A step replays when every sequence has one query token and samples, in order,
        and its batch and block table fit what was captured.
        """
        rows = inputs.input_ids.shape[0]
        attn = inputs.attn
        decode_shaped = (attn.max_seqlen_q == 1 and attn.seq_lens.shape[0] == rows
                         and inputs.sample_rows.shape[0] == rows)
        if not decode_shaped or rows > self.buckets[-1] or attn.block_tables.shape[1] > self.table_width:
            return None
        return next(b for b in self.buckets if b >= rows)

    def replay(self, inputs: StepInputs, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, H], logits [B, V]) of the step, as views valid until the next replay."""
        rows = inputs.input_ids.shape[0]
        self._static.fill(inputs, bucket)
        graph, hidden, logits = self._graphs[bucket]
        graph.replay()
        return hidden[:rows], logits[:rows]


class _VarlenInputs:
    """The varlen graphs' input buffers: max_tokens tokens, max_seqs sequences."""

    def __init__(self, max_tokens: int, max_seqs: int, table_width: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_seqs, table_width), dtype=torch.int32, device=device)

    def attention(self, tokens: int, seqs: int, block_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:seqs],
            seq_lens=self.seq_lens[:seqs], cu_seqlens_q=self.cu_seqlens_q[:seqs + 1],
            max_seqlen_q=tokens, max_seqlen_k=self.block_tables.shape[1] * block_size)

    def fill(self, inputs: StepInputs, tokens: int, seqs: int) -> None:
        """Copy a step of n tokens and b sequences in; tokens n..tokens-1 write slot 0 and
        belong to no sequence, sequence slots b..seqs-1 are empty."""
        n = inputs.input_ids.shape[0]
        attn = inputs.attn
        b = attn.seq_lens.shape[0]
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(attn.slot_mapping, non_blocking=True)
        self.slot_mapping[n:tokens].zero_()
        self.seq_lens[:b].copy_(attn.seq_lens, non_blocking=True)
        self.seq_lens[b:seqs].zero_()
        self.cu_seqlens_q[:b + 1].copy_(attn.cu_seqlens_q, non_blocking=True)
        self.cu_seqlens_q[b + 1:seqs + 1].fill_(n)
        self.block_tables[:b, :attn.block_tables.shape[1]].copy_(attn.block_tables, non_blocking=True)


class PrefillGraphs:
    """Captured varlen steps of one model over one KV cache (module docstring). Not thread-safe."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, max_tokens: int, max_seqs: int,
                 table_width: int) -> None:
        self.model = model
        self.cache = cache
        self.max_seqs = max_seqs
        self.table_width = table_width
        self.buckets = token_bucket_sizes(max_tokens)
        device = cache.layers[0][0].device
        self._static = _VarlenInputs(max(self.buckets, default=0), max_seqs, table_width, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @classmethod
    def capture(cls, model: CausalLM, cache: PagedKVCache, max_tokens: int, max_seqs: int,
                table_width: int, pool: tuple[int, int] | None = None) -> PrefillGraphs:
        """Capture every token bucket up to max_tokens, for up to max_seqs sequences with
        block tables up to table_width (in `pool`, or a new one)."""
        started = time.perf_counter()
        graphs = cls(model, cache, max_tokens, max_seqs, table_width)
        pool = pool or torch.cuda.graph_pool_handle()
        for bucket in reversed(graphs.buckets):
            graphs._graphs[bucket] = _record(lambda: graphs._forward(bucket), pool)
        torch.cuda.synchronize()
        logger.info("captured varlen CUDA graphs for %s tokens (up to %d sequences) in %.1f s",
                    graphs.buckets, max_seqs, time.perf_counter() - started)
        return graphs

    def _seqs(self, tokens: int) -> int:
        return min(self.max_seqs, tokens)  # every sequence brings at least one token

    def _forward(self, tokens: int) -> torch.Tensor:
        s = self._static
        return self.model(s.input_ids[:tokens], s.positions[:tokens], self.cache.layers,
                          s.attention(tokens, self._seqs(tokens), self.cache.block_size))

    def bucket_for(self, inputs: StepInputs) -> int | None:
        """The token bucket that replays this step, or None when it must run eagerly."""
        tokens = inputs.input_ids.shape[0]
        attn = inputs.attn
        if (not self.buckets or tokens > self.buckets[-1] or attn.seq_lens.shape[0] > self.max_seqs
                or attn.block_tables.shape[1] > self.table_width):
            return None
        return next(b for b in self.buckets if b >= tokens)

    def replay(self, inputs: StepInputs, bucket: int) -> torch.Tensor:
        """The step's hidden states [n, H], a view valid until the next replay."""
        self._static.fill(inputs, bucket, self._seqs(bucket))
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return hidden[:inputs.input_ids.shape[0]]
