"""CUDA graphs of the decode step: the model forward and its logits, at bucketed batch sizes.

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
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shardgen.shard.batch import StepInputs
from shardgen.shard.kv_cache import PagedKVCache
from shardgen.shard.layers.attention import AttentionMetadata
from shardgen.shard.models import CausalLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 256


@dataclass(frozen=True)
class GraphPolicy:
    """Whether to capture decode graphs, and for batches of up to how many rows."""

    enabled: bool
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"the CUDA-graph max batch size must be at least 1, got {self.max_batch_size}")

    @classmethod
    def default_for(cls, model: CausalLM, device: torch.device) -> GraphPolicy:
        """On for a single-rank CUDA model built with graph-safe ops.

        Several ranks stay eager unless asked: capturing NCCL collectives has not been
        checked on this code's GPUs yet.
        """
        return cls(enabled=device.type == "cuda" and model.ops.graph_safe and model.tp.world_size == 1)


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


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
                table_width: int) -> DecodeGraphs:
        """Capture every bucket up to max_batch_size for block tables up to table_width."""
        started = time.perf_counter()
        graphs = cls(model, cache, max_batch_size, table_width)
        pool = torch.cuda.graph_pool_handle()
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
        # An eager run first compiles the Triton kernels and sets up cuBLAS outside the capture.
        self._forward(rows)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden, logits = self._forward(rows)
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
