"""Rotary position embedding, HF rotate_half ("neox") style, applied to q and k in place.

Two entry points share one rotation:
  apply_rotary          rotates q and k.
  rotary_and_write_kv   rotates q and k, then stores the rotated k and v of each token at
                        its slot of the paged KV cache (what kv_cache.write_kv does), in the
                        same launch: a decode step saves one launch per layer and one read of k.

Algorithm
  One program per token rotates all of its query and key heads, so the token's cos/sin
  row ([R/2], already gathered at the token's position) is loaded once for Hq + Hkv heads.
  With x1 = x[..., :R/2] and x2 = x[..., R/2:R]:
      out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
  computed in fp32 and rounded once to x's dtype. R = 2 * cos.shape[1] is normally the
  head dim D; when R < D (partial rotary) the last D - R dims are left as they are.
  q and k may be strided views of a fused QKV output: each head row must be dense.
  The fused op then reads slot = slot_mapping[t] (negative: a padding token, rotated but
  not stored) and writes the rotated key halves still in registers, the key's unrotated
  tail and the value row to k_cache/v_cache viewed as [num_blocks * block_size, Hkv, D],
  cast to the cache's dtype: the same values as apply_rotary followed by write_kv.

Memory floor (bytes, e = element size of q/k/v, e_c of the cache, e_cs of cos/sin):
  apply_rotary          2 * T * (Hq + Hkv) * R * e + 2 * T * R/2 * e_cs
  rotary_and_write_kv   that + T * Hkv * D * (e + 2 * e_c) + 8 * T  (read v; write k and v
                        to the cache; read the slots)
FLOPs ~ 3 * T * (Hq + Hkv) * R: bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    check_dims,
    check_float,
    check_last_dim_contiguous,
    check_same_device,
    dependent_launch,
    dependent_launch_args,
    next_power_of_2,
    require,
)
from shardgen.shard.kernels.kv_cache import check_write_kv_args, to_cache_dtype


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, token, stride_ct, stride_st, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The token's cos and sin rows in fp32, shaped [1, BLOCK_HALF] to broadcast over heads."""
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    cos = tl.load(cos_ptr + token * stride_ct + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_st + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotates NUM_HEADS rows at x_ptr (head stride stride_h) in place.

    Returns the rotated halves [BLOCK_H, BLOCK_HALF] as stored (in x's dtype).
    """
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, token, stride_ct, stride_st, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ct,
    stride_st,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, token, stride_ct, stride_st, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    k_row = k_ptr + token * stride_kt
    key1, key2 = _rotate_heads(k_row, stride_kh, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_KH)
    head_ok = (heads < NUM_KV_HEADS)[:, None]
    cache_rows = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM
    half_dims = tl.arange(0, BLOCK_HALF)[None, :]
    half_mask = head_ok & (half_dims < HALF)
    k_first = k_cache_ptr + cache_rows + half_dims
    tl.store(k_first, to_cache_dtype(key1, k_cache_ptr), mask=half_mask)
    tl.store(k_first + HALF, to_cache_dtype(key2, k_cache_ptr), mask=half_mask)
    dims = tl.arange(0, BLOCK_D)[None, :]
    row_mask = head_ok & (dims < HEAD_DIM)
    if 2 * HALF < HEAD_DIM:  # partial rotary: the key's last D - R dims go to the cache unrotated
        tail_mask = row_mask & (dims >= 2 * HALF)
        key_tail = tl.load(k_row + heads[:, None] * stride_kh + dims, mask=tail_mask)
        tl.store(k_cache_ptr + cache_rows + dims, to_cache_dtype(key_tail, k_cache_ptr), mask=tail_mask)
    value = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims, mask=row_mask)
    tl.store(v_cache_ptr + cache_rows + dims, to_cache_dtype(value, v_cache_ptr), mask=row_mask)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place by cos/sin [T, R/2]; returns (q, k).

    cos/sin are already gathered at each token's position; R = 2 * cos.shape[1] <= D.
    """
    _check_rotary_args(q, k, cos, sin)
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    half = cos.shape[1]
    if num_tokens == 0 or half == 0:
        return q, k
    block_half = next_power_of_2(half)
    block_qh = next_power_of_2(num_q_heads)
    # ~8 fp32 pairs per thread over the larger (query) tile.
    num_warps = min(8, max(1, block_qh * block_half // 256))
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_QH=block_qh,
        BLOCK_KH=next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q, k


def rotary_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary(q, k, cos, sin) then write_kv(k, v, k_cache, v_cache, slot_mapping), in one launch.

    Rotates q [T, Hq, D] and k [T, Hkv, D] in place and returns (q, k); stores the rotated
    k and v [T, Hkv, D] at their slots of k_cache/v_cache [num_blocks, block_size, Hkv, D]
    (slot_mapping [T] int64, negative = padding: not stored). The grid depends on shapes
    only, so the launch can be captured in a CUDA graph. Slots must be
    < num_blocks * block_size (not checked: that would need a device sync).
    """
    _check_rotary_args(q, k, cos, sin)
    check_write_kv_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = cos.shape[1]
    if num_tokens == 0:
        return q, k
    block_half = next_power_of_2(half)
    block_qh = next_power_of_2(num_q_heads)
    block_kh = next_power_of_2(num_kv_heads)
    block_d = next_power_of_2(head_dim)
    # ~8 elements per thread over the larger tile: query halves, or the value rows.
    num_warps = min(8, max(1, max(block_qh * block_half, block_kh * block_d) // 256))
    pdl = dependent_launch_args(q.device)
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        BLOCK_HALF=block_half,
        BLOCK_D=block_d,
        **pdl,
        num_warps=num_warps,
    )
    return q, k


def _check_rotary_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_dims("q", q, 3, "[T, Hq, D]")
    check_dims("k", k, 3, "[T, Hkv, D]")
    check_dims("cos", cos, 2, "[T, D // 2]")
    require(sin.shape == cos.shape, f"sin shape {tuple(sin.shape)} differs from cos shape {tuple(cos.shape)}")
    for name, tensor in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, tensor)
        check_last_dim_contiguous(name, tensor)
    num_tokens, _, head_dim = q.shape
    require(
        k.shape[0] == num_tokens and k.shape[2] == head_dim,
        f"k {tuple(k.shape)} must have q's {num_tokens} tokens and head_dim {head_dim}",
    )
    require(cos.shape[0] == num_tokens, f"cos has {cos.shape[0]} rows for {num_tokens} tokens")
    require(
        2 * cos.shape[1] <= head_dim,
        f"cos/sin of {cos.shape[1]} frequencies rotate {2 * cos.shape[1]} dims, more than head_dim {head_dim}",
    )
    check_same_device(q=q, k=k, cos=cos, sin=sin)
