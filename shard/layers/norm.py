"""RMSNorm with the numerics of transformers' LlamaRMSNorm, plain and fused with the residual add."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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


class RMSNorm(nn.Module):
    """Replicated RMSNorm; given a residual it adds it first and returns the new residual too.

    `ops` picks the implementation (shard/layers/ops.py); None is the torch one here.
    """

    def __init__(self, hidden_size: int, eps: float, ops: Ops | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self._norm = ops.rms_norm if ops is not None else rms_norm
        self._fused = ops.fused_add_rms_norm if ops is not None else fused_add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._fused(x, residual, self.weight, self.eps)
