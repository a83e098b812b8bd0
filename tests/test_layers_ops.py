"""Norm, rotary and activation ops against the transformers code they stand in for."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from shardgen.shard.layers.activation import silu_and_mul
from shardgen.shard.layers.norm import RMSNorm, fused_add_rms_norm, rms_norm
from shardgen.shard.layers.rotary import RotaryEmbedding, apply_rotary


def _hf_norm(hidden: int, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_bitwise_hf(dtype: torch.dtype) -> None:
    x = (torch.randn(7, 48) * 3).to(dtype)
    weight = torch.randn(48).to(dtype)
    with torch.no_grad():
        expected = _hf_norm(48, weight, 1e-5, dtype)(x)
    assert torch.equal(rms_norm(x, weight, 1e-5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_is_hf_residual_then_norm(dtype: torch.dtype) -> None:
    x, residual = torch.randn(5, 32).to(dtype), torch.randn(5, 32).to(dtype)
    weight = torch.randn(32).to(dtype)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-6)
    with torch.no_grad():
        expected = _hf_norm(32, weight, 1e-6, dtype)(residual + x)
    assert torch.equal(summed, residual + x)
    assert torch.equal(normed, expected)
    module = RMSNorm(32, 1e-6).to(dtype)
    module.weight.data.copy_(weight)
    module_normed, module_summed = module(x, residual)
    assert torch.equal(module_normed, normed) and torch.equal(module_summed, summed)


ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_rotary_matches_hf(rope: str) -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, rope_parameters=dict(ROPE[rope]))
    head_dim = 32
    positions = torch.tensor([0, 1, 5, 31, 32, 77, 127])
    q, k = torch.randn(7, 2, head_dim), torch.randn(7, 1, head_dim)
    hf_rotary = LlamaRotaryEmbedding(config)
    cos_full, sin_full = hf_rotary(q, positions[None])  # [1, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_full, sin_full)
    cos, sin = RotaryEmbedding(config, head_dim, config.max_position_embeddings)(positions)
    assert cos.shape == (7, head_dim // 2)
    ours_q, ours_k = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_rotary_refuses_length_dependent_scaling() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
        "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        RotaryEmbedding(config, 32, 64)


def test_silu_and_mul_is_hf_gated_silu() -> None:
    gate, up = torch.randn(6, 20), torch.randn(6, 20)
    expected = ACT2FN["silu"](gate) * up
    # Not bitwise: silu over a strided half of the fused tensor takes another vector path.
    torch.testing.assert_close(silu_and_mul(torch.cat([gate, up], dim=-1)), expected, atol=1e-6, rtol=1e-6)
