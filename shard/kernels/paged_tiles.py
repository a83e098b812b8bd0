"""Device helpers shared by the decode and prefill attention kernels.

Both kernels walk a sequence's keys in tiles of BLOCK_N consecutive positions. A tile need
not line up with the cache's pages: each position p is looked up on its own,
    slot(p) = block_tables[b, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE,
so one tile may span several pages (BLOCK_N 64 over pages of 16) or part of one. Every
row of a K or V tile is one position's HEAD_DIM contiguous elements of one KV head, so
a tile load is BLOCK_N gathered rows of 2*HEAD_DIM bytes (bf16), coalesced into 16-byte
vector loads. Positions past `limit` are masked and read nothing: slots outside a
sequence may hold garbage (even NaN) and must never reach the softmax.

The softmax is the usual online one in base 2: scores arrive pre-multiplied by
scale * log2(e), so exp2 replaces exp. The running max starts at a large finite negative
instead of -inf so that a row with every score masked so far yields exp2(-inf) = 0, never
-inf - -inf = NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Running-max start value: below any real score, yet finite (see the module docstring).
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634


@triton.jit
def kv_tile_offsets(
    block_table_row,
    positions,
    valid,
    kv_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """Element offsets [BLOCK_N, HEAD_DIM] (int64) of positions' rows of one KV head.

    valid masks the block-table reads (None: every position is in range); a masked
    position gets an arbitrary offset, so loads through it must be masked too.
    """
    page = tl.load(block_table_row + positions // PAGE_SIZE, mask=valid).to(tl.int64)
    slot = page * PAGE_SIZE + positions % PAGE_SIZE
    dims = tl.arange(0, HEAD_DIM)
    return (slot * NUM_KV_HEADS + kv_head)[:, None] * HEAD_DIM + dims[None, :]


@triton.jit
def as_dot_dtype(q, k_cache_ptr):
    """q in the dtype its dots with the keys and values run in. An fp8 cache's rows convert
    to fp16 in one instruction per pair (to bf16 only through fp32), so a bf16 q over an
    fp8 cache runs its dots in fp16; the softmax and the sums stay in fp32."""
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        if q.dtype == tl.bfloat16:
            q = q.to(tl.float16)
    return q


@triton.jit
def online_softmax_step(
    q, k, v, scores_mask, m_i, l_i, acc, scale_log2, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """Folds one K/V tile into the running (max, sum, weighted values) of each query row.

    q [M, D], k/v [N, D] (in q's dtype, or fp8 read as it), scores_mask [M, N] (True =
    attend; ignored unless MASKED); m_i, l_i [M]; acc [M, D] fp32.
    """
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        scores = tl.where(scores_mask, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def normalize(acc, l_i):
    """acc / l per row; a row that attended to nothing (l == 0) comes out as zeros."""
    safe = tl.where(l_i > 0.0, l_i, 1.0)
    return acc / safe[:, None]
