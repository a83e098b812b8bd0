"""silu_and_mul: the gated MLP activation on a fused gate_up projection.

Algorithm
  x [T, 2I] holds gate = x[:, :I] and up = x[:, I:]; out [T, I] = silu(gate) * up.
  Program (t, c) handles columns [c * BLOCK, (c + 1) * BLOCK) of row t: two contiguous
  loads, one store. Numerics follow torch's F.silu(gate) * up in the input dtype: silu is
  computed in fp32 and rounded to x's dtype, then the product is computed in fp32 and
  rounded again (two roundings, exactly as the eager ops do).

Memory floor (bytes, e = element size): 3 * T * I * e (read 2I, write I per row).
FLOPs ~ 5 * T * I: bandwidth-bound.

silu_and_mul_fp8 (`--quantize fp8`, the input of down_proj) computes the same rounded
products and writes them quantized per row, as shard/layers/quant.py does after
silu_and_mul: one program per row finds the row's largest magnitude, then stores e4m3 and
the row's scale. A row of up to MAX_ONE_PASS columns stays in registers; a longer one is
computed twice. Memory floor: T * I * (2e + 1) + 4T bytes, a third less than the two
kernels it replaces read and write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    check_dims,
    check_float,
    check_last_dim_contiguous,
    next_power_of_2,
    require,
)
from shardgen.shard.layers.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, Fp8Rows

# Columns per program: 16 bytes per thread at bf16 with 4 warps, few programs per row.
BLOCK_COLS = 1024
# silu_and_mul_fp8: rows up to this wide stay in registers (Llama-3.1-8B: 14,336); wider
# ones go in pieces of BLOCK_COLS_FP8.
MAX_ONE_PASS = 16384
BLOCK_COLS_FP8 = 4096


@triton.jit
def _silu_mul(x_row, inter, cols, mask, dtype: tl.constexpr):
    """silu(gate) * up of one row's `cols`, rounded as the eager ops round, as fp32."""
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr, out_ptr, scale_ptr, stride_x, stride_o, inter,
    FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        act = _silu_mul(x_row, inter, cols, cols < inter, dtype)
        amax = tl.max(tl.abs(act), axis=0)
    else:
        running = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, inter, BLOCK):
            piece = _silu_mul(x_row, inter, c0 + cols, c0 + cols < inter, dtype)
            running = tl.maximum(running, tl.abs(piece))
        amax = tl.max(running, axis=0)
    amax = tl.maximum(amax, MIN_AMAX)
    inverse = tl.math.div_rn(tl.full((), FP8_MAX, tl.float32), amax)
    tl.store(scale_ptr + row, tl.math.div_rn(amax, tl.full((), FP8_MAX, tl.float32)))
    if ONE_PASS:
        q = tl.clamp(act * inverse, -FP8_MAX, FP8_MAX)
        tl.store(out_row + cols, q.to(out_ptr.dtype.element_ty), mask=cols < inter)
    else:
        for c0 in range(0, inter, BLOCK):
            piece = _silu_mul(x_row, inter, c0 + cols, c0 + cols < inter, dtype)
            q = tl.clamp(piece * inverse, -FP8_MAX, FP8_MAX)
            tl.store(out_row + c0 + cols, q.to(out_ptr.dtype.element_ty), mask=c0 + cols < inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> new [T, I] tensor: silu(x[:, :I]) * x[:, I:], in x's dtype."""
    check_dims("x", x, 2, "[T, 2I]")
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    num_tokens, width = x.shape
    require(width % 2 == 0, f"x's last dim must be even (gate and up halves), got {width}")
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(BLOCK_COLS, triton.next_power_of_2(inter))
    grid = (num_tokens, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Rows:
    """[T, 2I] -> silu(x[:, :I]) * x[:, I:] rounded to x's dtype, then quantized per row to
    e4m3: new values [T, I] and scales [T, 1] (shard/layers/quant.py's silu_and_mul_fp8)."""
    check_dims("x", x, 2, "[T, 2I]")
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    num_tokens, width = x.shape
    require(width % 2 == 0, f"x's last dim must be even (gate and up halves), got {width}")
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((num_tokens, 1), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or inter == 0:
        return Fp8Rows(out, scale.fill_(MIN_AMAX / FP8_MAX))
    one_pass = inter <= MAX_ONE_PASS
    block = next_power_of_2(inter) if one_pass else BLOCK_COLS_FP8
    _silu_and_mul_fp8_kernel[(num_tokens,)](
        x, out, scale, x.stride(0), out.stride(0), inter,
        FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX, BLOCK=block, ONE_PASS=one_pass,
        num_warps=min(16, max(1, block // 512)),
    )
    return Fp8Rows(out, scale)
