"""silu_and_mul: the gated MLP activation on a fused gate_up projection.

Algorithm
  x [T, 2I] holds gate = x[:, :I] and up = x[:, I:]; out [T, I] = silu(gate) * up.
  Program (t, c) handles columns [c * BLOCK, (c + 1) * BLOCK) of row t: two contiguous
  loads, one store. Numerics follow torch's F.silu(gate) * up in the input dtype: silu is
  computed in fp32 and rounded to x's dtype, then the product is computed in fp32 and
  rounded again (two roundings, exactly as the eager ops do).

Memory floor (bytes, e = element size): 3 * T * I * e (read 2I, write I per row).
FLOPs ~ 5 * T * I: bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import check_dims, check_float, check_last_dim_contiguous, require

# Columns per program: 16 bytes per thread at bf16 with 4 warps, few programs per row.
BLOCK_COLS = 1024


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
