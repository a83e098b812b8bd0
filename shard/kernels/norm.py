"""RMSNorm, plain and fused with the residual add, with HF LlamaRMSNorm's numerics.

Algorithm
  One program per row; the whole row (H <= MAX_HIDDEN) stays in registers, so x is read
  once. Numerics follow transformers' LlamaRMSNorm step by step:
      h      = x + residual                  in the input dtype (fused variant only;
                                             rounded like torch's add, and returned)
      var    = mean(float32(h) ** 2)
      normed = (float32(h) * rsqrt(var + eps)).to(x.dtype)
      out    = weight * normed               in the promoted dtype of weight and x
  i.e. the normalised row is rounded to the model dtype BEFORE the weight multiplies it.

The fp8 variants (`--quantize fp8`: the norm feeds a quantized projection) round the output
to its dtype as above, then quantize the row as shard/layers/quant.py does (largest
magnitude -> 448) and store e4m3 values and the row's fp32 scale instead.

Memory floor (bytes, e = element size, T rows of H):
  rms_norm            2 * T * H * e + H * e_w
  fused_add_rms_norm  4 * T * H * e + H * e_w   (x, residual in; normed, sum out)
  the fp8 variants    write the normed rows in 1 byte per element, plus 4 per row
FLOPs ~ 4 * T * H: bandwidth-bound by three orders of magnitude.
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
from shardgen.shard.kernels.quant import store_fp8, store_row_scale
from shardgen.shard.layers.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, Fp8Rows

# Rows longer than this would spill registers in a one-pass kernel.
MAX_HIDDEN = 65536
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_out_ptr,
    scale_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    FP8_OUT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MIN_AMAX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the input dtype, as the model's eager add does (torch adds fp16/bf16
        # in fp32 and rounds once; so does this).
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_out_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, 0) / hidden
    normed = (x32 * (1.0 / tl.sqrt_rn(variance + eps))).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    if FP8_OUT:
        out = out.to(OUT_DTYPE).to(tl.float32)
        inverse = store_row_scale(scale_ptr + row, tl.max(tl.abs(out), axis=0), FP8_MAX, MIN_AMAX)
        store_fp8(out_ptr + row * stride_o + cols, out, inverse, mask, FP8_MAX)
    else:
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dim of x [..., H] (typically [T, H]); new tensor.

    The output dtype is torch.promote_types(weight.dtype, x.dtype), as in HF.
    """
    _check_norm_args(x, None, weight, eps)
    out = _empty_output(x, weight)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is in x's dtype. New tensors."""
    _check_norm_args(x, residual, weight, eps)
    out = _empty_output(x, weight)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, summed)
    return out, summed


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Rows:
    """rms_norm(x [T, H]) quantized per row to e4m3 (new values [T, H], scales [T, 1])."""
    _check_norm_args(x, None, weight, eps)
    check_dims("x", x, 2, "[T, H]")
    out = _fp8_output(x)
    _launch(x, None, weight, eps, out.values, None, out.scale)
    return out


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[Fp8Rows, torch.Tensor]:
    """(rms_norm(x + residual) quantized per row to e4m3, x + residual): fused_add_rms_norm
    whose normed rows feed a quantized projection."""
    _check_norm_args(x, residual, weight, eps)
    check_dims("x", x, 2, "[T, H]")
    out = _fp8_output(x)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out.values, summed, out.scale)
    return out, summed


def _empty_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)


def _fp8_output(x: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device),
                   torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    summed: torch.Tensor | None,
    scale: torch.Tensor | None = None,
) -> None:
    """One program per row; out and summed are fresh contiguous tensors shaped like x. With
    `scale` ([rows, 1] fp32) out is e4m3: the rows, rounded to the norm's dtype, quantized."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0 or hidden == 0:
        return
    r2 = _rows(residual) if residual is not None else x2
    out2 = out.view(-1, hidden)
    s2 = summed.view(-1, hidden) if summed is not None else out2  # unused without a residual
    block = next_power_of_2(hidden)
    # About 8 elements per thread (16 bytes at bf16), at most 16 warps.
    num_warps = min(16, max(1, block // 256))
    norm_dtype = torch.promote_types(weight.dtype, x.dtype)
    pdl = dependent_launch_args(x.device)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out2, s2, scale if scale is not None else out2,
        x2.stride(0), r2.stride(0), out2.stride(0), s2.stride(0),
        hidden, eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        OUT_DTYPE=_TL_DTYPES[norm_dtype],
        FP8_OUT=scale is not None,
        FP8_MAX=FP8_MAX,
        MIN_AMAX=MIN_AMAX,
        **pdl,
        num_warps=num_warps,
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with dense rows: a view where the layout allows one, else a copy."""
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


def _check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> None:
    require(x.dim() >= 1, f"x must be [..., H], got shape {tuple(x.shape)}")
    check_float("x", x)
    check_float("weight", weight)
    check_dims("weight", weight, 1, "[H]")
    hidden = x.shape[-1]
    require(weight.shape[0] == hidden, f"weight has {weight.shape[0]} elements for rows of {hidden}")
    require(hidden <= MAX_HIDDEN, f"rows of {hidden} elements exceed the kernel's limit of {MAX_HIDDEN}")
    require(weight.is_contiguous(), f"weight must be contiguous, got stride {weight.stride()}")
    check_last_dim_contiguous("x", x)
    require(eps >= 0.0, f"eps must be >= 0, got {eps}")
    if residual is not None:
        require(
            residual.shape == x.shape and residual.dtype == x.dtype,
            f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}",
        )
        check_last_dim_contiguous("residual", residual)
        check_same_device(x=x, residual=residual, weight=weight)
    else:
        check_same_device(x=x, weight=weight)
