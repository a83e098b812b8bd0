"""Warm-up: run the largest step the router will send, then size the KV cache.

On CUDA the step runs against a small temporary cache while the allocator records its
peak; the real cache then takes what is left of `cuda_memory_fraction` of the device,
less what the decode CUDA graphs will hold (captured after the cache, so estimated).
On CPU the cache is `kv_cache_bytes` large. `--num-blocks` overrides both.

On CUDA warm-up also runs every projection at each row count a step may give it
(`gemm_row_counts`, `warm_projections`): cuBLAS picks a different kernel for many row
counts and loads each at its first use, and that load waits until the device has run
everything queued. While serving, that would stall the launch of the step ahead until the
device drains (benchmark/NOTES.md, ninth pass), once per kernel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shardgen.shard.batch import NewSequence, StoppingParams
from shardgen.shard.kv_cache import KVCacheSpec
from shardgen.shard.layers.linear import ParallelLinear
from shardgen.shard.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Every processor on (and no top_k: the full-vocabulary sort is the costlier path), so that
# the sampler's peak memory is part of the measurement.
_WARMUP_SAMPLING = SamplingParams(
    temperature=0.7, top_k=0, top_p=0.9, typical_p=0.95, min_p=0.01, repetition_penalty=1.1,
    frequency_penalty=0.1, presence_penalty=0.1, do_sample=True, seed=0, watermark=True)
_WARMUP_TOP_N = 5


@dataclass(frozen=True)
class WarmupShape:
    """The step to warm up with: sequence lengths summing to the prefill budget."""

    lengths: list[int]

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @classmethod
    def of(cls, max_prefill_tokens: int, max_batch_size: int, max_total_tokens: int,
           max_positions: int) -> WarmupShape:
        """As many sequences as a step may hold (one row each for the sampler), the
        first as long as allowed (the largest attention), the rest sharing the tokens."""
        if min(max_prefill_tokens, max_batch_size, max_total_tokens) < 1:
            raise ValueError(
                f"warm-up needs positive sizes, got max_batch_prefill_tokens={max_prefill_tokens}, "
                f"max_batch_size={max_batch_size}, max_total_tokens={max_total_tokens}")
        cap = min(max_total_tokens, max_positions)
        count = min(max_batch_size, max_prefill_tokens)
        total = min(max_prefill_tokens, count * cap)
        first = min(cap, total - (count - 1))
        rest, extra = divmod(total - first, count - 1) if count > 1 else (0, 0)
        return cls([first] + [rest + (1 if i < extra else 0) for i in range(count - 1)])

    def sequences(self, block_size: int, vocab_size: int) -> list[NewSequence]:
        """The warm-up requests; they all share blocks 1..n (their content is garbage).
        The first asks for prompt log-probabilities, whose logits are part of the peak."""
        blocks = list(range(1, self.blocks_needed(block_size)))
        return [
            NewSequence(
                request_id=i, input_ids=[(i + p) % vocab_size for p in range(length)],
                blocks=blocks, slots=[block_size + p for p in range(length)], start=0, end=length,
                sampling=_WARMUP_SAMPLING, stopping=StoppingParams(1, False, frozenset()),
                prefill_logprobs=i == 0, top_n_tokens=_WARMUP_TOP_N, generated_offset=0)
            for i, length in enumerate(self.lengths)]

    def blocks_needed(self, block_size: int) -> int:
        """Blocks of the temporary cache: block 0 and those of the longest sequence."""
        return 1 + math.ceil(self.longest / block_size)


# Graph memory beyond the logits: per-layer activations of the largest bucket, split-decode
# partials, cuBLAS workspaces of the capture stream, the graphs' own bookkeeping.
_GRAPH_SLACK_BYTES = 256 * 2**20


def graph_reserve_bytes(max_graph_batch: int, vocab_size: int, hidden_size: int,
                        max_graph_tokens: int = 0, intermediate_size: int = 0) -> int:
    """Memory to leave for decode graphs of up to `max_graph_batch` rows and varlen graphs
    of up to `max_graph_tokens` tokens (their pool is shared: the larger need counts).

    The decode pool keeps the largest bucket's outputs alive: float32 logits (and the
    model-dtype ones they are cast from) and a few hidden-sized activations per row. A
    varlen step holds, per token, a layer's activations at once: about a dozen hidden-sized
    and three intermediate-sized vectors (fused gate and up, their product), in 4 bytes to
    be generous.
    """
    decode = max_graph_batch * (vocab_size * (4 + 4) + 16 * hidden_size * 4)
    varlen = max_graph_tokens * (12 * hidden_size + 3 * intermediate_size) * 4
    return max(decode, varlen) + _GRAPH_SLACK_BYTES


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device in bytes, 0 for a CPU (Info reports it to the router)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).total_memory


def cuda_num_blocks(spec: KVCacheSpec, device: torch.device, memory_fraction: float,
                    temporary_cache_bytes: int, reserved_bytes: int = 0) -> int:
    """Blocks that fit after a warm-up step, from the allocator's statistics.

    Call after running the step with a temporary cache of `temporary_cache_bytes` still
    allocated, having reset the peak statistics before it. `reserved_bytes` stay free for
    what is allocated after the cache (the decode graphs).
    """
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    # Memory outside torch's allocator: the CUDA context, NCCL, other processes.
    outside = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * memory_fraction) - outside - (peak - temporary_cache_bytes) - reserved_bytes
    logger.info("warm-up: %.2f GiB total, %.2f GiB peak of the step, %.2f GiB outside torch, "
                "%.2f GiB kept for graphs; %.2f GiB for the KV cache", total / 2**30, peak / 2**30,
                outside / 2**30, reserved_bytes / 2**30, budget / 2**30)
    return spec.blocks_for_bytes(budget)


def required_blocks(max_total_tokens: int, block_size: int) -> int:
    """Blocks one longest sequence needs, plus reserved block 0."""
    return 1 + math.ceil(max_total_tokens / block_size)


def gemm_row_counts(max_batch_size: int, max_prefill_tokens: int) -> list[int]:
    """Row counts at which warm-up runs every projection: each batch size a decode step may
    have, and each token count of a full prefill step (the budget, plus up to one token for
    each running request). Partial prefill steps between the two meet their kernels while
    serving, or run as varlen CUDA graphs, which load theirs when captured."""
    return sorted(set(range(1, max_batch_size + 1))
                  | set(range(max_prefill_tokens, max_prefill_tokens + max_batch_size + 1)))


def warm_projections(model: nn.Module, row_counts: Iterable[int], dtype: torch.dtype) -> int:
    """Run each distinct projection of `model` once at every row count (layers whose weights
    have one shape and dtype run the same kernels); returns how many distinct ones there are.

    The inputs are zeros of `dtype` (which kernel cuBLAS picks depends on the shapes only);
    only the local product runs, no collective, so ranks need not call this in step.
    """
    distinct: dict[tuple[object, ...], ParallelLinear] = {}
    for module in model.modules():
        if isinstance(module, ParallelLinear):
            distinct.setdefault((tuple(module.weight.shape), module.weight.dtype, module.bias is not None), module)
    counts = sorted(set(row_counts))
    for layer in distinct.values():
        inputs = torch.zeros((counts[-1], layer.weight.shape[1]), dtype=dtype, device=layer.weight.device)
        for rows in counts:
            layer.matmul(inputs[:rows], layer.bias)
    return len(distinct)
