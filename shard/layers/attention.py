"""Attention over the paged KV cache: the step metadata and the torch reference path.

Every step is "varlen queries over a paged cache": sequence b brings q_len_b new tokens
(1 for a decode, more for a prefill or a chunk after a cached prefix) and, after this
step's writes, holds seq_lens[b] tokens in its blocks. Its i-th new token sits at
position seq_lens[b] - q_len_b + i and attends causally to positions 0 .. that one (or
to the last `sliding_window` of them).

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
slot s = block * block_size + offset. A cache holds the model's dtype or fp8 e4m3
(`--kv-cache-dtype fp8`): keys and values are stored unscaled, saturated to +-448, and
read back as q's dtype. The functions here are the CPU production path and
the oracle the Triton kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from shardgen.shard.layers.ops import Ops


@dataclass
class AttentionMetadata:
    """Where one step's tokens go in the paged cache and what each of them attends to."""

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0 (block 0 = padding)
    seq_lens: torch.Tensor  # [B] int32: tokens in cache per sequence AFTER this step's writes
    cu_seqlens_q: torch.Tensor  # [B+1] int32: prefix sums of new tokens per sequence
    max_seqlen_q: int
    max_seqlen_k: int


def make_attention_metadata(
    block_tables: Sequence[Sequence[int]],
    cache_lens: Sequence[int],
    query_lens: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Builds the metadata of a step from per-sequence block lists.

    Sequence b has cache_lens[b] tokens already in its blocks and computes query_lens[b]
    new ones; its blocks must cover all of them. Slots follow the contract's rule
    blocks[p // block_size] * block_size + p % block_size.
    """
    if not len(block_tables) == len(cache_lens) == len(query_lens):
        raise ValueError(
            f"one entry per sequence expected, got {len(block_tables)} block tables, "
            f"{len(cache_lens)} cache lengths, {len(query_lens)} query lengths"
        )
    slots: list[int] = []
    seq_lens = []
    for blocks, cached, new in zip(block_tables, cache_lens, query_lens):
        total = cached + new
        if total > len(blocks) * block_size:
            raise ValueError(f"{total} tokens need {-(-total // block_size)} blocks, the sequence has {len(blocks)}")
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(cached, total))
        seq_lens.append(total)
    width = max((len(blocks) for blocks in block_tables), default=0)
    padded = [list(blocks) + [0] * (width - len(blocks)) for blocks in block_tables]
    cu_seqlens = [0]
    for new in query_lens:
        cu_seqlens.append(cu_seqlens[-1] + new)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
        max_seqlen_q=max(query_lens, default=0),
        max_seqlen_k=max(seq_lens, default=0),
    )


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores key/value [T, Hkv, D] of the new tokens at their slots of the caches."""
    for rows, cache in ((key, k_cache), (value, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        if flat.dtype == torch.float8_e4m3fn:
            # Saturate first: torch's own cast makes NaN past +-448 in some versions (2.11).
            # index_copy_ has no fp8 kernel on CPU; the bytes are what is copied anyway.
            limit = torch.finfo(flat.dtype).max
            flat, rows = flat.view(torch.uint8), rows.clamp(-limit, limit).to(flat.dtype).view(torch.uint8)
        flat.index_copy_(0, slot_mapping, rows.to(flat.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the paged cache -> [T, Hq, D].

    Query heads share KV heads in groups of Hq // Hkv. sliding_window > 0 limits each
    query to the last `sliding_window` positions up to and including its own.
    max_seqlen_q is not needed here (the Triton dispatch reads it: 1 with one token per
    sequence is a decode step).
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    q_lens = [end - start for start, end in zip(starts, starts[1:])]
    # Decode tokens (one per sequence) go through one batched call: the common step.
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        out[rows] = _attend_decodes(
            q[rows], k_cache, v_cache, block_tables[decodes], seq_lens[decodes], scale, sliding_window
        )
    for b, q_len in enumerate(q_lens):
        if q_len > 1:
            k, v = (t.to(q.dtype) for t in _gather_sequence(k_cache, v_cache, block_tables[b], lens[b]))
            q_pos = torch.arange(lens[b] - q_len, lens[b], device=q.device)
            mask = _visible(q_pos[:, None], torch.arange(lens[b], device=q.device)[None, :], sliding_window)
            out[starts[b]:starts[b + 1]] = _sdpa(q[starts[b]:starts[b + 1]], k, v, mask, scale)
    return out


def _gather_sequence(
    k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len keys and values [seq_len, Hkv, D] of one sequence, in position order."""
    used = blocks[: -(-seq_len // k_cache.shape[1])].long()
    return k_cache[used].flatten(0, 1)[:seq_len], v_cache[used].flatten(0, 1)[:seq_len]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """Which keys each query sees (broadcasting q_pos against k_pos)."""
    mask = k_pos <= q_pos
    if sliding_window > 0:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _attend_decodes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """One query per sequence, [B, Hq, D], over keys padded to the longest sequence.

    A padding row (seq_len 0: it sees no key) comes out as zeros, as in the Triton kernel.
    """
    seen = seq_lens > 0
    if not bool(seen.any()):
        return torch.zeros_like(q)
    block_size = k_cache.shape[1]
    num_blocks = -(-int(seq_lens.max()) // block_size)
    used = block_tables[:, :num_blocks].long()
    k = k_cache[used].flatten(1, 2).to(q.dtype)  # [B, num_blocks * block_size, Hkv, D]
    v = v_cache[used].flatten(1, 2).to(q.dtype)
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    q_pos = (seq_lens.long() - 1)[:, None]
    mask = _visible(q_pos, k_pos, sliding_window)  # [B, K]; causal, so never past seq_len
    # Slots past a sequence's end may hold anything (even NaN); zero every masked-out key
    # and value so that nothing leaks into the scores or the weighted sum.
    k = k.masked_fill(~mask[:, :, None, None], 0)
    v = v.masked_fill(~mask[:, :, None, None], 0)
    out = _sdpa_batched(q[:, None], k, v, mask[:, None, :], scale)[:, 0]
    return out.masked_fill(~seen[:, None, None], 0)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D], mask [Lq, Lk] -> [Lq, Hq, D]."""
    return _sdpa_batched(q[None], k[None], v[None], mask[None], scale)[0]


def _sdpa_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk] -> [B, Lq, Hq, D]."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=2) if groups > 1 else v
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Writes the step's keys and values into the paged cache, then attends over it.

    q/k/v arrive already projected and rotated, split into this rank's heads. `ops` picks
    the implementation (shard/layers/ops.py); None is the torch one of this module. A
    caller that has already written the keys and values (ops.rotary_and_write_kv) calls
    `attend` instead of the module.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int = 0,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        self._write_kv = ops.write_kv if ops is not None else write_kv
        self._paged_attention = ops.paged_attention if ops is not None else paged_attention
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self._write_kv(k, v, k_cache, v_cache, attn.slot_mapping)
        return self.attend(q, kv_cache, attn)

    def attend(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """Attention of q over a cache that already holds this step's keys and values."""
        k_cache, v_cache = kv_cache
        return self._paged_attention(
            q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.cu_seqlens_q,
            attn.max_seqlen_q, self.scale, self.sliding_window,
        )
