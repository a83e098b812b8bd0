"""Paged decode attention (one new token per sequence): GQA-packed flash-decoding.

Algorithm
  Program (b, g, p) handles sequence b, KV head g and partition p. It loads the
  QPK = Hq / Hkv query rows that share KV head g as one [BLOCK_G, D] tile (BLOCK_G =
  max(16, next_pow2(QPK)), the smallest tl.dot M), so every K/V tile is read from memory
  once per KV head, not once per query head. The visible keys [start, seq_len) (start =
  seq_len - sliding_window with a window, else 0) are cut into BLOCK_N tiles and the
  tiles dealt out to P partitions in contiguous runs; each partition runs the online
  softmax over its run (see paged_tiles).
  - P == 1: the program normalises and writes the output directly (one launch).
  - P > 1 (flash-decoding, for batches too small to fill the GPU): each partition writes
    its unnormalised accumulator and its (max, sum) in fp32; a second kernel, one program
    per (b, query head), rescales the partials to the global max and sums them.
  P is fixed on the host from shapes only (batch, KV heads, SM count, block-table width),
  never from seq_lens' values, so a launch needs no device sync and can be captured in a
  CUDA graph; each sequence then splits its own length into P runs, so short and long
  sequences in one batch both spread over P programs.

Varlen launch (the one-token sequences of a mixed step)
  With cu_seqlens_q given, q holds a varlen step (attention.py's layout) and sequence b's
  token is row cu_seqlens_q[b], not row b. The programs of sequences that bring any
  other number of tokens (prompts and chunks, padding sequences) exit at once: those are
  the prefill kernel's, which skips the one-token ones in turn. Which sequences are
  which is read on the device, so the launch stays shape-only and graph-safe. In the
  prefill kernel those rows took ~1.6x their time here (benchmark/NOTES.md, eleventh
  pass: a prefill program holds ~100 KB of shared memory, so few run per SM, and a
  one-token row's walk over its keys is latency-bound). The reduce kernel's partition
  tile is MAX_PARTITIONS wide in this mode, so that the split of a step of any batch
  size runs one compiled variant (a mixed step's batch varies freely while serving, and
  compiling a variant mid-run stalls the step).

Memory floor (bytes, e = element size, C_b = min(seq_len_b, window or inf)):
  2 * sum_b C_b * Hkv * D * e          K and V, each read once
  + 2 * B * Hq * D * e                 q in, output out
  + [P > 1] 2 * B * Hq * P * (D + 2) * 4   fp32 partials written, then read
FLOPs: 4 * sum_b C_b * Hq * D (QK^T and PV), far below the tensor cores' rate at these
arithmetic intensities: decode attention is bandwidth-bound, hence the GQA packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    check_tile,
    dependent_launch,
    dependent_launch_args,
    dot_precision,
    next_power_of_2,
    num_sms,
    require,
)
from shardgen.shard.kernels.paged_tiles import (
    as_dot_dtype,
    LOG2E,
    NEG_BIG,
    kv_tile_offsets,
    normalize,
    online_softmax_step,
)

# A partition shorter than this costs more in its partials than it gains in parallelism:
# one 64-key tile reads 32 KiB of K/V per KV head (D = 128, bf16) against ~2 KiB of fp32
# partials. (256 left a batch of one on an H100 at 40 programs: 8.8 us per layer at 1K
# context against a 1.4 us floor.)
MIN_PARTITION_TOKENS = 64
# The reduce kernel holds [MAX_PARTITIONS, D] fp32 partials of one row in registers.
MAX_PARTITIONS = 64
# Programs per SM that the split aims for: enough to hide the gather latency.
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernels.

    num_partitions None lets choose_num_partitions decide (the production setting); a
    number forces the split (tests, tuning).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_partitions: int | None = None

    def __post_init__(self) -> None:
        check_tile("block_n", self.block_n)
        parts = self.num_partitions
        require(
            parts is None or 1 <= parts <= MAX_PARTITIONS,
            f"num_partitions must be None or in [1, {MAX_PARTITIONS}], got {parts}",
        )


def default_decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """A K and a V tile of ~8-16 KB each, three or two deep in the software pipeline.

    dtype is the cache's: fp8 rows of 128 dims take 128-row tiles, two deep (an H100 sweep
    at B=256, context 1150: 273 us against 283-318 us for 64-row tiles and 3 stages).
    """
    row_bytes = head_dim * dtype.itemsize
    if row_bytes <= 128:
        return DecodeConfig(block_n=128, num_warps=4, num_stages=2)
    if row_bytes <= 256:
        return DecodeConfig(block_n=64, num_warps=4, num_stages=3)
    if row_bytes <= 512:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=16, num_warps=4, num_stages=2)


def choose_num_partitions(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Partitions per sequence: enough programs to fill the GPU, none shorter than MIN_PARTITION_TOKENS.

    max_context is the longest context the block tables can describe (their width times
    the page size): an upper bound known without reading seq_lens.
    """
    programs = max(batch * num_kv_heads, 1)
    by_occupancy = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), programs)
    by_length = triton.cdiv(max_context, MIN_PARTITION_TOKENS)
    return max(1, min(by_occupancy, by_length, MAX_PARTITIONS))


@triton.jit
def _query_row(cu_seqlens_q_ptr, b, VARLEN: tl.constexpr):
    """Row of q that holds sequence b's new token: b in a decode step; in a varlen step
    cu_seqlens_q[b], or -1 when b brings another number of tokens than one."""
    if VARLEN:
        start = tl.load(cu_seqlens_q_ptr + b)
        single = tl.load(cu_seqlens_q_ptr + b + 1) - start == 1
        return tl.where(single, start, -1)
    return b


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    scale_log2,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    QPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    token = _query_row(cu_seqlens_q_ptr, b, VARLEN)
    if token < 0:
        return

    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - sliding_window, 0)
    num_tiles = tl.cdiv(tl.maximum(seq_len - start, 0), BLOCK_N)
    tiles_per_part = tl.cdiv(num_tiles, num_parts)
    tile_lo = part * tiles_per_part
    tile_hi = tl.minimum(tile_lo + tiles_per_part, num_tiles)

    group = tl.arange(0, BLOCK_G)
    heads = kv_head * QPK + group
    head_ok = group < QPK
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + token.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )
    q = as_dot_dtype(q, k_cache_ptr)

    m_i = tl.full([BLOCK_G], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        positions = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = positions < seq_len
        offsets = kv_tile_offsets(table_row, positions, valid, kv_head, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE)
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, valid[None, :], m_i, l_i, acc, scale_log2, True, DOT_PRECISION)

    if SPLIT:
        # Partials are laid out [B, Hq, P(, D)]; empty partitions store (NEG_BIG, 0, 0).
        row = (b.to(tl.int64) * NUM_Q_HEADS + heads) * num_parts + part
        tl.store(part_m_ptr + row, m_i, mask=head_ok)
        tl.store(part_l_ptr + row, l_i, mask=head_ok)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None])
    else:
        out = normalize(acc, l_i)
        tl.store(
            out_ptr + token.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_ok[:, None],
        )


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    cu_seqlens_q_ptr,
    num_parts,
    stride_ot,
    stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    VARLEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch(USE_PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    token = _query_row(cu_seqlens_q_ptr, b, VARLEN)
    if token < 0:
        return
    parts = tl.arange(0, BLOCK_P)
    part_ok = parts < num_parts
    row = (b.to(tl.int64) * NUM_Q_HEADS + head) * num_parts + parts
    m = tl.load(part_m_ptr + row, mask=part_ok, other=NEG_BIG)
    part_sums = tl.load(part_l_ptr + row, mask=part_ok, other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))
    denom = tl.sum(weight * part_sums, 0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=part_ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    config: DecodeConfig | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
) -> None:
    """Writes decode attention of q [B, Hq, D] (row b = sequence b's one new token) into out.

    With cu_seqlens_q, q [T, Hq, D] is a varlen step: only the rows of its one-token
    sequences are written (module docstring, "Varlen launch").
    Arguments are validated by attention.paged_attention; call that instead.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    batch = seq_lens.shape[0]
    _, page_size, num_kv_heads, _ = k_cache.shape
    qpk = num_q_heads // num_kv_heads
    cfg = config or default_decode_config(head_dim, k_cache.dtype)
    parts = cfg.num_partitions or choose_num_partitions(
        batch, num_kv_heads, block_tables.shape[1] * page_size, q.device
    )
    split = parts > 1
    varlen = cu_seqlens_q is not None
    pdl = dependent_launch_args(q.device)
    part_acc = part_m = part_l = out  # placeholders: the unsplit kernel never touches them
    if split:
        part_acc = torch.empty((batch, num_q_heads, parts, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((batch, num_q_heads, parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    cu = cu_seqlens_q if varlen else seq_lens  # a placeholder outside the varlen launch
    _decode_partition_kernel[(batch, num_kv_heads, parts)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, block_tables, seq_lens, cu,
        scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        QPK=qpk,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_G=max(16, next_power_of_2(qpk)),
        BLOCK_N=cfg.block_n,
        USE_WINDOW=sliding_window > 0,
        SPLIT=split,
        VARLEN=varlen,
        DOT_PRECISION=dot_precision(q.dtype),
        **pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        _decode_reduce_kernel[(batch, num_q_heads)](
            out, part_acc, part_m, part_l, cu, parts, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            BLOCK_P=MAX_PARTITIONS if varlen else next_power_of_2(parts),
            VARLEN=varlen,
            **pdl,
            num_warps=4,
        )
