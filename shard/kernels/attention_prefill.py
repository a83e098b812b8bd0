"""Paged prefill attention: varlen causal queries over a paged cache with a cached prefix.

Algorithm (flash-attention 2 over the block table)
  Sequence b brings q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens whose K/V
  are already in the cache; its i-th sits at position ctx_b + i, ctx_b = seq_len_b - q_len_b
  (a reused prefix or earlier chunks); sequences with one new token are the decode
  kernel's (attention.py), and their programs exit. A program takes BLOCK_Q of those
  tokens and the QPK = Hq / Hkv query heads that share KV head g, packed as
  BLOCK_M = BLOCK_Q * QPK rows (row r = token r // QPK, head r % QPK): every K/V tile is
  loaded once for all heads of the group, which multiplies the tile's reuse by QPK. It
  walks the keys that any of its rows can see, [lo, hi) with hi = last row's position + 1
  and lo = 0 or, with a sliding window, first row's position - window + 1, in BLOCK_N
  tiles gathered through the block table (paged_tiles), masking per row: key <= position
  (causal) and key > position - window. Whole tiles that every row sees (before the
  first row's position, inside the last row's window) run without masks; only the
  diagonal and window edges pay for them.
  Online softmax in fp32, one normalisation at the end, output in q's dtype.

Launch grid (graph-safe: it depends on shapes only, never on lengths on the device)
  Query tiles are numbered across the step: sequence b's tiles take the numbers from
      start_b = cu_seqlens_q[b] // BLOCK_Q + b
  on. start_{b+1} - start_b >= ceil(q_len_b / BLOCK_Q) (floor((c + n) / Q) >= floor(c / Q)
  + floor(n / Q), and the + 1 pays for a partial tile), so the numbers never collide; a
  sequence leaves at most one number unused, and one with q_len 0 (padding) exactly one.
  The numbers up to ceil(T / BLOCK_Q) + B cover every tile, so the launch is
  (ceil(T / BLOCK_Q) + B) * Hkv programs whatever the lengths, and a CUDA graph captured
  for T tokens and B sequences replays correctly for any step of that shape. Of the P
  programs, p handles KV head p % Hkv of tile number (P - 1 - p) // Hkv: numbers run
  backwards, so that a sequence's last tiles, which see the most keys, start first and
  the short ones fill the end of the launch. It finds its sequence by a binary search
  over cu_seqlens_q (the largest b with start_b <= number: log2(B + 1) scalar loads, no
  extra launch, no host sync); an unused number exits at once.
  Rows past cu_seqlens_q[B] (a step padded to its graph's T) belong to numbers from
  start_B on, which cover them (ceil(T / Q) - floor(c / Q) >= ceil((T - c) / Q)):
  those programs write zeros there instead of exiting.

Memory floor (bytes, e = element size):
  2 * sum_b S_b * Hkv * D * e     K and V of every visible position, read once
  + 2 * T * Hq * D * e            q in, output out
  (the kernel rereads K/V once per query tile: sum_b ceil(q_len_b / BLOCK_Q) * S_b rows.)
FLOPs (causal, no window): 4 * Hq * D * sum_b sum_i (ctx_b + i + 1) -- prefill is
compute-bound for q_len beyond a few hundred tokens; measure it in TFLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import check_tile, dot_precision, next_power_of_2
from shardgen.shard.kernels.paged_tiles import (
    as_dot_dtype,
    LOG2E,
    NEG_BIG,
    kv_tile_offsets,
    normalize,
    online_softmax_step,
)


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel; block_m counts packed (token, head) rows."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_tile("block_m", self.block_m)
        check_tile("block_n", self.block_n)


def default_prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Hopper-sized tiles, shrunk as a K/V row grows so that q plus the pipelined K/V
    tiles stay near 100 KB of shared memory (H100/H200 have 227 KB per block).

    Rows of 129-512 bytes, head dim 128 in 16 bits among them (Llama, Mistral, Qwen2): 64-row
    tiles (16 tokens x 4 query heads), 32 keys per step, 4 warps; for head dim 128 the best
    summed over the sweep's cases on an H100 in two sweeps, and 14-18% faster than 128 x 64
    tiles at 8 warps on chunks of long prompts (8,192 tokens after 57K and 92K cached;
    benchmark/NOTES.md, thirteenth pass).
    """
    row_bytes = head_dim * dtype.itemsize
    if row_bytes <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if row_bytes <= 512:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


@triton.jit
def _attend_keys(
    q,
    positions,
    start,
    end,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    kv_head,
    m_i,
    l_i,
    acc,
    scale_log2,
    sliding_window,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds keys [start, end) into the rows' softmax state; MASKED=False trusts every
    key to be visible to every row and (end - start) to be a multiple of BLOCK_N."""
    for tile_start in range(start, end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        if MASKED:
            key_ok = keys < end
            offsets = kv_tile_offsets(table_row, keys, key_ok, kv_head, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE)
            k = tl.load(k_cache_ptr + offsets, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_cache_ptr + offsets, mask=key_ok[:, None], other=0.0)
            visible = key_ok[None, :] & (keys[None, :] <= positions[:, None])
            if USE_WINDOW:
                visible = visible & (keys[None, :] > positions[:, None] - sliding_window)
            m_i, l_i, acc = online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale_log2, True, DOT_PRECISION)
        else:
            offsets = kv_tile_offsets(table_row, keys, None, kv_head, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE)
            k = tl.load(k_cache_ptr + offsets)
            v = tl.load(v_cache_ptr + offsets)
            m_i, l_i, acc = online_softmax_step(q, k, v, None, m_i, l_i, acc, scale_log2, False, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _locate_tile(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """(b, first) for tile number `tile`: its sequence b (num_seqs for the trailing padding
    rows) and its first token's offset within that sequence's rows (module docstring)."""
    lo = num_seqs * 0
    hi = num_seqs
    # Invariant: start_lo <= tile < start_(hi+1); start_0 = 0 <= tile.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        starts_by = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(starts_by, mid, lo)
        hi = tl.where(starts_by, hi, mid - 1)
    first_tile = tl.load(cu_seqlens_q_ptr + lo) // BLOCK_Q + lo
    return lo, (tile - first_tile) * BLOCK_Q


@triton.jit
def _packed_rows(
    first_token,
    end_token,
    kv_head,
    QPK: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Token and query head of each packed row of a tile, and which rows are real (token < end_token)."""
    rows = tl.arange(0, BLOCK_M)
    tokens = first_token + rows // QPK
    heads = kv_head * QPK + rows % QPK
    # rows // QPK < BLOCK_Q drops the spare rows when QPK does not divide BLOCK_M.
    row_ok = (rows // QPK < BLOCK_Q) & (tokens < end_token)
    return tokens, heads, row_ok


@triton.jit
def _row_offsets(tokens, heads, stride_t, stride_h, HEAD_DIM: tl.constexpr):
    """Element offsets [BLOCK_M, HEAD_DIM] of packed rows in a [T, H, D] tensor."""
    dims = tl.arange(0, HEAD_DIM)
    return tokens.to(tl.int64)[:, None] * stride_t + heads[:, None] * stride_h + dims[None, :]


# The step's shape arrives as plain ints: specialising on them (== 1, divisible by 16)
# would compile a variant per graph bucket for nothing.
@triton.jit(do_not_specialize=["num_tokens", "num_seqs"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    num_tokens,
    num_seqs,
    scale_log2,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    QPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # KV head varies fastest: the Hkv programs of one query tile run side by side and
    # gather the same pages (a page row holds every KV head of a position), the same q
    # rows and output rows, so each DRAM sector they share is fetched once into L2.
    # Tile numbers run backwards: the heaviest tiles first (module docstring).
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    tile = (tl.num_programs(0) - 1 - tl.program_id(0)) // NUM_KV_HEADS
    seq, first = _locate_tile(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    if seq == num_seqs:
        # Rows past the last sequence: padding of a graph-sized step, zeroed.
        tokens, heads, row_ok = _packed_rows(q_start + first, num_tokens, kv_head, QPK, BLOCK_Q, BLOCK_M)
        zeros = tl.zeros([BLOCK_M, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + _row_offsets(tokens, heads, stride_ot, stride_oh, HEAD_DIM), zeros, mask=row_ok[:, None])
        return
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if first >= q_len:
        return
    if q_len == 1:
        return  # the decode kernel's varlen launch writes one-token sequences (attention.py)
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    tokens, heads, row_ok = _packed_rows(q_start + first, q_start + q_len, kv_head, QPK, BLOCK_Q, BLOCK_M)
    positions = context + tokens - q_start
    q = tl.load(q_ptr + _row_offsets(tokens, heads, stride_qt, stride_qh, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    q = as_dot_dtype(q, k_cache_ptr)

    # Keys [lo, hi) are visible to some row. Inside them, [bulk_lo, bulk_hi) holds whole
    # tiles visible to every row (at or before the first row's position, inside the last
    # row's window): those skip the masks. The edges around them are masked.
    last = context + tl.minimum(first + BLOCK_Q, q_len) - 1
    hi = last + 1
    lo = 0
    bulk_lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context + first - sliding_window + 1, 0)
        bulk_lo = tl.maximum(last - sliding_window + 1, lo)
    bulk_tiles = tl.maximum(context + first + 1 - bulk_lo, 0) // BLOCK_N
    bulk_hi = bulk_lo + bulk_tiles * BLOCK_N

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if USE_WINDOW:
        m_i, l_i, acc = _attend_keys(
            q, positions, lo, bulk_lo, k_cache_ptr, v_cache_ptr, table_row, kv_head, m_i, l_i, acc,
            scale_log2, sliding_window, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, USE_WINDOW, DOT_PRECISION,
        )
    m_i, l_i, acc = _attend_keys(
        q, positions, bulk_lo, bulk_hi, k_cache_ptr, v_cache_ptr, table_row, kv_head, m_i, l_i, acc,
        scale_log2, sliding_window, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, False, USE_WINDOW, DOT_PRECISION,
    )
    m_i, l_i, acc = _attend_keys(
        q, positions, bulk_hi, hi, k_cache_ptr, v_cache_ptr, table_row, kv_head, m_i, l_i, acc,
        scale_log2, sliding_window, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, USE_WINDOW, DOT_PRECISION,
    )

    out = normalize(acc, l_i)
    tl.store(
        out_ptr + _row_offsets(tokens, heads, stride_ot, stride_oh, HEAD_DIM),
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def launch_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    config: PrefillConfig | None = None,
) -> None:
    """Writes varlen paged attention of q [T, Hq, D] into out: every row of a sequence of
    two or more new tokens, and zeros in the rows past cu_seqlens_q[-1] (cu_seqlens_q[-1]
    may be below T). The rows of one-token sequences are left alone: the decode kernel's
    varlen launch writes them.

    The launch reads no value off the device and sizes its grid from shapes alone, so it
    can be captured in a CUDA graph and replayed for any lengths of the same shapes.
    Arguments are validated by attention.paged_attention; call that instead.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    qpk = num_q_heads // num_kv_heads
    cfg = config or default_prefill_config(head_dim, q.dtype)
    # A group wider than the tile gets a tile of its own (one token per program).
    block_m = max(cfg.block_m, next_power_of_2(qpk))
    block_q = block_m // qpk
    num_seqs = seq_lens.shape[0]
    # Tile numbers of the step (module docstring): fewer than cdiv(T, block_q) + B.
    grid = ((triton.cdiv(num_tokens, block_q) + num_seqs) * num_kv_heads,)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q,
        num_tokens, num_seqs, scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        QPK=qpk,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        USE_WINDOW=sliding_window > 0,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
