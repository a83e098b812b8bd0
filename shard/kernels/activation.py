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
silu_and_mul: the quantize kernel of kernels/quant.py, computing the activation as it
reads (one program per row; a row of up to 16,384 columns stays in registers). Memory
floor: T * I * (2e + 1) + 4T bytes, a third less than the two kernels it replaces.
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
    require,
)
from shardgen.shard.kernels.quant import launch_quantize_rows, row_values
from shardgen.shard.layers.quant import Fp8Rows

# Columns per program: 16 bytes per thread at bf16 with 4 warps, few programs per row.
BLOCK_COLS = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    dependent_launch(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    product = row_values(x_ptr + row * stride_x, cols, inter, SILU_MUL=True)
    tl.store(out_ptr + row * stride_o + cols, product.to(out_ptr.dtype.element_ty), mask=cols < inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> new [T, I] tensor: silu(x[:, :I]) * x[:, I:], in x's dtype."""
    inter = _checked_gate_up(x)
    num_tokens = x.shape[0]
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(BLOCK_COLS, triton.next_power_of_2(inter))
    grid = (num_tokens, triton.cdiv(inter, block))
    pdl = dependent_launch_args(x.device)
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block, **pdl, num_warps=4)
    return out


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Rows:
    """[T, 2I] -> silu(x[:, :I]) * x[:, I:] rounded to x's dtype, then quantized per row to
    e4m3: new values [T, I] and scales [T, 1] (shard/layers/activation.py's silu_and_mul_fp8),
    by the quantize kernel computing the activation as it reads (kernels/quant.py)."""
    return launch_quantize_rows(x, _checked_gate_up(x), silu_mul=True)


def _checked_gate_up(x: torch.Tensor) -> int:
    """I, the width of the gate and up halves of x [T, 2I]; ValueError when x cannot be one."""
    check_dims("x", x, 2, "[T, 2I]")
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    width = x.shape[1]
    require(width % 2 == 0, f"x's last dim must be even (gate and up halves), got {width}")
    return width // 2
