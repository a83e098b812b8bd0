"""write_kv: store a step's new keys and values at their slots of the paged KV cache.

Algorithm
  One program per new token t. It reads slot = slot_mapping[t]; a negative slot marks a
  padding token (CUDA-graph batches padded to a captured size) and the program returns
  without writing. Otherwise it copies the token's [Hkv, D] key and value rows to
  k_cache/v_cache viewed as [num_blocks * block_size, Hkv, D] at row `slot`
  (slot = block * block_size + offset). Source rows may be strided views (k and v sliced
  out of a fused QKV projection); each row's D elements must be contiguous, so every
  program does 16-byte vector loads and stores. Values are cast to the cache's dtype; an
  fp8 e4m3 cache stores them unscaled, saturated to +-448 (`to_cache_dtype`).

Memory floor (bytes): 2 * T * Hkv * D * (e_in + e_cache) + 8 * T  (read k, v; write both;
read the slots). There is no arithmetic: this kernel only moves bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    check_contiguous,
    check_dims,
    check_float,
    check_index_dtype,
    check_kv_cache_dtype,
    check_last_dim_contiguous,
    check_same_device,
    next_power_of_2,
    require,
)


FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # the largest finite float8_e4m3fn


@triton.jit
def to_cache_dtype(x, cache_ptr):
    """x cast to the cache's element type; into fp8 e4m3, saturated to +-448 first."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    key = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offsets, to_cache_dtype(key, k_cache_ptr), mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_cache_ptr + cache_offsets, to_cache_dtype(value, v_cache_ptr), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] in place.

    slot_mapping [T] int64: the slot of each token; negative = skip (padding). Slots must
    be < num_blocks * block_size (not checked: that would need a device sync).
    """
    check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_h = next_power_of_2(num_kv_heads)
    block_d = next_power_of_2(head_dim)
    # ~8 elements per thread: one 16-byte vector per thread and tensor at bf16.
    num_warps = min(8, max(1, block_h * block_d // 256))
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


def check_write_kv_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Validates write_kv's arguments (also checked by rotary.rotary_and_write_kv, which stores the same rows)."""
    check_dims("key", key, 3, "[T, Hkv, D]")
    require(value.shape == key.shape, f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    check_dims("k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, D]")
    require(
        v_cache.shape == k_cache.shape,
        f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}",
    )
    require(
        tuple(key.shape[1:]) == tuple(k_cache.shape[2:]),
        f"key rows [Hkv, D] = {list(key.shape[1:])} do not match the cache's {list(k_cache.shape[2:])}",
    )
    check_float("key", key)
    check_float("value", value)
    check_kv_cache_dtype("k_cache", k_cache)
    check_kv_cache_dtype("v_cache", v_cache)
    check_last_dim_contiguous("key", key)
    check_last_dim_contiguous("value", value)
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    check_dims("slot_mapping", slot_mapping, 1, "[T]")
    check_index_dtype("slot_mapping", slot_mapping, torch.int64)
    check_contiguous("slot_mapping", slot_mapping)
    require(
        slot_mapping.shape[0] == key.shape[0],
        f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens",
    )
    check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
