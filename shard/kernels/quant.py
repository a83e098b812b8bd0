"""quantize_rows_fp8: per-token dynamic fp8 quantization of a projection's input.

Algorithm
  One program per row of x [M, K]. It finds the row's largest magnitude b (floored at
  MIN_AMAX), then writes xq = saturate(x * (448 / b)) as float8 e4m3 and scale = b / 448,
  exactly as shard/layers/quant.quantize_rows_fp8 does (the same fp32 operations, each
  correctly rounded, so the two agree bit for bit on the GPU). A row of up to
  MAX_ONE_PASS elements is loaded once and kept in registers; a longer one is read twice
  (the second pass from L2), in BLOCK_K pieces.

Memory floor (bytes, e = x's element size): M * K * (e + 1) + 4 * M.
FLOPs ~ 3 * M * K: bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import check_dims, check_float, check_last_dim_contiguous, next_power_of_2
from shardgen.shard.layers.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, Fp8Rows

# Rows up to this long stay in registers (Llama-3.1-8B's down_proj input: 14,336).
MAX_ONE_PASS = 16384
# Piece of a longer row per loop iteration.
BLOCK_K = 4096


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, scale_ptr, K, stride_x, stride_o,
    FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        running = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            piece = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(piece))
        amax = tl.max(running, axis=0)
    amax = tl.maximum(amax, MIN_AMAX)
    inverse = tl.math.div_rn(tl.full((), FP8_MAX, tl.float32), amax)
    tl.store(scale_ptr + row, tl.math.div_rn(amax, tl.full((), FP8_MAX, tl.float32)))
    if ONE_PASS:
        q = tl.clamp(x * inverse, -FP8_MAX, FP8_MAX)
        tl.store(out_row + cols, q.to(out_ptr.dtype.element_ty), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK):
            piece = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(piece * inverse, -FP8_MAX, FP8_MAX)
            tl.store(out_row + k0 + cols, q.to(out_ptr.dtype.element_ty), mask=k0 + cols < K)


def quantize_rows_fp8(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] -> (new xq [M, K] e4m3, new scale [M, 1] fp32), x ~= xq * scale per row.

    x's rows may be strided (dense along K). Launch parameters depend on the shape only:
    capturable in a CUDA graph.
    """
    check_dims("x", x, 2, "[M, K]")
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    m, k = x.shape
    out = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return Fp8Rows(out, scale)
    one_pass = k <= MAX_ONE_PASS
    block = next_power_of_2(max(k, 1)) if one_pass else BLOCK_K
    _quantize_rows_kernel[(m,)](
        x, out, scale, k, x.stride(0), out.stride(0),
        FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX, BLOCK=block, ONE_PASS=one_pass,
        num_warps=min(16, max(1, block // 512)),
    )
    return Fp8Rows(out, scale)
