"""Gated activations of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.shard.layers.quant import Fp8Rows, quantize_rows_fp8


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(first half) * second half (gate and up of a fused gate_up)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Rows:
    """silu_and_mul, then quantize_rows_fp8: a quantized down_proj's input (one kernel in Triton)."""
    return quantize_rows_fp8(silu_and_mul(x))


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
