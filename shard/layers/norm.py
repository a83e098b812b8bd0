"""RMSNorm with the numerics of transformers' LlamaRMSNorm, plain and fused with the residual add."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardgen.shard.layers.quant import Fp8Rows, quantize_rows_fp8

if TYPE_CHECKING:
    from shardgen.shard.layers.ops import Ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)): variance in float32, cast back to x's dtype before the weight."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is taken in the input dtype."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Rows:
    """rms_norm, then quantize_rows_fp8 (a quantized qkv_proj's input; one kernel in Triton)."""
    return quantize_rows_fp8(rms_norm(x, weight, eps))


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[Fp8Rows, torch.Tensor]:
    """fused_add_rms_norm with its normed rows quantized (qkv_proj's or gate_up_proj's input)."""
    normed, summed = fused_add_rms_norm(x, residual, weight, eps)
    return quantize_rows_fp8(normed), summed


class RMSNorm(nn.Module):
    """Replicated RMSNorm; given a residual it adds it first and returns the new residual too.

    `ops` picks the implementation (shard/layers/ops.py); None is the torch one here. With
    fp8=True (the next projection is quantized, `--quantize fp8`) the normed rows come back
    quantized per row (an Fp8Rows, shard/layers/quant.py).
    """

    def __init__(self, hidden_size: int, eps: float, ops: Ops | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self._norm = ops.rms_norm if ops is not None else rms_norm
        self._fused = ops.fused_add_rms_norm if ops is not None else fused_add_rms_norm
        self._norm_fp8 = ops.rms_norm_fp8 if ops is not None else rms_norm_fp8
        self._fused_fp8 = ops.fused_add_rms_norm_fp8 if ops is not None else fused_add_rms_norm_fp8

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, fp8: bool = False) -> Any:
        """The normed rows (an Fp8Rows with fp8), and with a residual also x + residual."""
        if residual is None:
            return (self._norm_fp8 if fp8 else self._norm)(x, self.weight, self.eps)
        return (self._fused_fp8 if fp8 else self._fused)(x, residual, self.weight, self.eps)
