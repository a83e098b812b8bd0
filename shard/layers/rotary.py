"""Rotary position embedding (neox / HF rotate_half style) with a precomputed cos-sin table.

Frequencies come from transformers' own rope init functions, so every scaling variant
(linear, llama3, yarn) matches the reference implementation by construction. Variants
whose frequencies depend on the current sequence length (dynamic NTK, longrope) cannot
live in a static table and are refused at load. rotary_and_write_kv also stores the
rotated keys and the values in the paged KV cache: the reference of the Triton op that
does both in one launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from shardgen.shard.layers.attention import write_kv

# "default" is computed here; the others are delegated to transformers.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DEFAULT_THETA = 10000.0


def _rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    # transformers 5 standardises everything into `rope_parameters`; 4.x kept the
    # scaling in `rope_scaling` and the base in `rope_theta`.
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2] float32, attention scaling of cos and sin)."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", _DEFAULT_THETA))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    if inv_freq.numel() * 2 != head_dim:
        raise ValueError(
            f"partial rotary embedding is not supported: rotary dim {inv_freq.numel() * 2}, head_dim {head_dim}"
        )
    return inv_freq.float(), float(scaling)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] by cos/sin [T, D // 2] (gathered at positions).

    Pairs dimension i with i + D/2 (HF rotate_half), in the dtype of q and k.
    """
    cos = cos.unsqueeze(1).to(q.dtype)
    sin = sin.unsqueeze(1).to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary(q, k, cos, sin), then write_kv of the rotated k and v at slot_mapping; returns (q, k) rotated.

    The reference of the fused Triton op, which does both in one launch.
    """
    q, k = apply_rotary(q, k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds cos and sin (float32, attention scaling applied) for positions [0, max_positions)."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = rope_inv_freq(config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float, device="cpu")
        freqs = positions[:, None] * inv_freq[None, :]
        device = torch.get_default_device()
        self.max_positions = max_positions
        self.register_buffer("cos", (freqs.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, D // 2] at the given absolute positions [T]."""
        return self.cos[positions], self.sin[positions]
