"""quantize_rows_fp8: per-token dynamic fp8 quantization of a projection's input.

Algorithm
  One program per row of x [M, K]. It finds the row's largest magnitude b (floored at
  MIN_AMAX), then writes xq = saturate(x * (448 / b)) as float8 e4m3 and scale = b / 448,
  exactly as shard/layers/quant.quantize_rows_fp8 does (the same fp32 operations, each
  correctly rounded, so the two agree bit for bit on the GPU). A row of up to
  MAX_ONE_PASS elements is loaded once and kept in registers; a longer one is read twice
  (the second pass from L2), in BLOCK_K pieces. The same kernel quantizes the activation
  of a gate_up row as it computes it (activation.silu_and_mul_fp8), and its two last steps
  (store_row_scale, store_fp8) end the fp8 norms too (norm.py).

Memory floor (bytes, e = x's element size): M * K * (e + 1) + 4 * M.
FLOPs ~ 3 * M * K: bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    check_dims,
    check_float,
    check_last_dim_contiguous,
    dependent_launch,
    dependent_launch_args,
    next_power_of_2,
)
from shardgen.shard.layers.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, Fp8Rows

# Rows up to this long stay in registers (Llama-3.1-8B's down_proj input: 14,336).
MAX_ONE_PASS = 16384
# Piece of a longer row per loop iteration.
BLOCK_K = 4096


@triton.jit
def row_values(x_row, cols, width, SILU_MUL: tl.constexpr):
    """fp32 values of columns `cols` of a row: x's own, or with SILU_MUL silu(gate) * up of a
    fused gate_up row ([gate | up], `width` each) as the eager ops round it: silu rounded to
    x's dtype, then the product (activation.py's kernels compute it so too)."""
    mask = cols < width
    if SILU_MUL:
        dtype = x_row.dtype.element_ty
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        return (silu * up).to(dtype).to(tl.float32)
    return tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row_scale(scale_ptr, amax, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    """Stores a row's scale, amax / FP8_MAX (amax floored at MIN_AMAX); returns FP8_MAX / amax,
    what its values are multiplied by. Both divisions correctly rounded, as torch's."""
    amax = tl.maximum(amax, MIN_AMAX)
    tl.store(scale_ptr, tl.math.div_rn(amax, tl.full((), FP8_MAX, tl.float32)))
    return tl.math.div_rn(tl.full((), FP8_MAX, tl.float32), amax)


@triton.jit
def store_fp8(ptr, values, inverse, mask, FP8_MAX: tl.constexpr):
    """Stores values * inverse, saturated to +-FP8_MAX, in ptr's e4m3."""
    quantized = tl.clamp(values * inverse, -FP8_MAX, FP8_MAX)
    tl.store(ptr, quantized.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, scale_ptr, width, stride_x, stride_o,
    FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        x = row_values(x_row, cols, width, SILU_MUL)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        running = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, width, BLOCK):
            running = tl.maximum(running, tl.abs(row_values(x_row, k0 + cols, width, SILU_MUL)))
        amax = tl.max(running, axis=0)
    inverse = store_row_scale(scale_ptr + row, amax, FP8_MAX, MIN_AMAX)
    if ONE_PASS:
        store_fp8(out_row + cols, x, inverse, cols < width, FP8_MAX)
    else:
        for k0 in range(0, width, BLOCK):
            piece = row_values(x_row, k0 + cols, width, SILU_MUL)
            store_fp8(out_row + k0 + cols, piece, inverse, k0 + cols < width, FP8_MAX)


def quantize_rows_fp8(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] -> (new xq [M, K] e4m3, new scale [M, 1] fp32), x ~= xq * scale per row.

    x's rows may be strided (dense along K). Launch parameters depend on the shape only:
    capturable in a CUDA graph.
    """
    check_dims("x", x, 2, "[M, K]")
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    return launch_quantize_rows(x, x.shape[1], silu_mul=False)


def launch_quantize_rows(x: torch.Tensor, width: int, silu_mul: bool) -> Fp8Rows:
    """Quantizes the `width` values of each row of checked x [M, ...]: x's own columns, or
    with silu_mul the activation of a [M, 2 * width] gate_up (activation.silu_and_mul_fp8)."""
    m = x.shape[0]
    out = torch.empty((m, width), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return Fp8Rows(out, scale)
    one_pass = width <= MAX_ONE_PASS
    block = next_power_of_2(max(width, 1)) if one_pass else BLOCK_K
    pdl = dependent_launch_args(x.device)
    _quantize_rows_kernel[(m,)](
        x, out, scale, width, x.stride(0), out.stride(0),
        FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX, BLOCK=block, ONE_PASS=one_pass, SILU_MUL=silu_mul,
        **pdl,
        num_warps=min(16, max(1, block // 512)),
    )
    return Fp8Rows(out, scale)
