"""Rotary position embedding, HF rotate_half ("neox") style, applied to q and k in place.

Algorithm
  One program per token rotates all of its query and key heads, so the token's cos/sin
  row ([R/2], already gathered at the token's position) is loaded once for Hq + Hkv heads.
  With x1 = x[..., :R/2] and x2 = x[..., R/2:R]:
      out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
  computed in fp32 and rounded once to x's dtype. R = 2 * cos.shape[1] is normally the
  head dim D; when R < D (partial rotary) the last D - R dims are left as they are.
  q and k may be strided views of a fused QKV output: each head row must be dense.

Memory floor (bytes, e = element size):
  2 * T * (Hq + Hkv) * R * e  (read and write the rotated dims) + 2 * T * R/2 * e_cs
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
    next_power_of_2,
    require,
)


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
    """Rotates NUM_HEADS rows at x_ptr (head stride stride_h) in place."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


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
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    cos = tl.load(cos_ptr + token * stride_ct + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_st + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


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
