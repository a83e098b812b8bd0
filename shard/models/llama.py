"""The Llama family: Llama 2/3/3.1, Mistral (sliding window) and Qwen2 (q/k/v bias).

One stack, Attention -> MLP -> DecoderLayer -> Model -> CausalLM, built from this rank's
tensor-parallel layers. The families differ only in data read from config.json: which
projections carry a bias, and which layers attend through a sliding window.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.attention import Attention, AttentionMetadata
from shardgen.shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardgen.shard.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardgen.shard.layers.norm import RMSNorm
from shardgen.shard.layers.ops import TORCH_OPS, Ops
from shardgen.shard.layers.rotary import RotaryEmbedding
from shardgen.shard.models.base import CausalLM

KVCache = tuple[torch.Tensor, torch.Tensor]


def head_dim_of(config: PretrainedConfig) -> int:
    """config.head_dim when set (it may differ from hidden_size / heads), else that ratio."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: PretrainedConfig, layer_idx: int) -> int:
    """The window of one layer, 0 for full attention.

    Mistral windows every layer when config.sliding_window is set; Qwen2 names the
    windowed layers in config.layer_types (and may switch windows off altogether).
    """
    window = getattr(config, "sliding_window", None) or 0
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return 0
    return window


def _linear_ops(ops: Ops, tp: TensorParallelGroup) -> Ops:
    """The ops of the projections: the model's on one rank; the torch ones over several.

    The Triton small-batch linear beats cuBLAS on the device but costs ~50 us of host time
    per launch against ~15; several ranks run their steps eagerly (no graphs), where that
    host time is on the critical path.
    """
    return ops if tp.world_size == 1 else TORCH_OPS


class LlamaAttention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, layer_idx: int, qkv_bias: bool, o_bias: bool, tp: TensorParallelGroup,
        ops: Ops,
    ) -> None:
        super().__init__()
        self.rotary_and_write_kv = ops.rotary_and_write_kv
        head_dim = head_dim_of(config)
        linear_ops = _linear_ops(ops, tp)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, qkv_bias, tp,
            linear_ops,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, o_bias, tp,
                                        linear_ops)
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
            scale=head_dim**-0.5, sliding_window=sliding_window_of(config, layer_idx), ops=ops,
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache, attn: AttentionMetadata
    ) -> torch.Tensor:
        proj = self.qkv_proj
        q, k, v = self.qkv_proj(hidden).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = q.view(-1, proj.num_heads, proj.head_dim)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        # Rotates q and k (in place with Triton) and writes the rotated k and v into the cache.
        q, _ = self.rotary_and_write_kv(q, k, v, cos, sin, *kv_cache, attn.slot_mapping)
        out = self.attn.attend(q, kv_cache, attn)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, bias: bool, tp: TensorParallelGroup, ops: Ops) -> None:
        super().__init__()
        self.silu_and_mul = ops.silu_and_mul
        self.silu_and_mul_fp8 = ops.silu_and_mul_fp8
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: 'silu'")
        size = config.intermediate_size
        linear_ops = _linear_ops(ops, tp)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias, tp, linear_ops)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp, linear_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.down_proj.quantized:   # --quantize fp8: the activation writes down_proj's fp8 input
            return self.down_proj(self.silu_and_mul_fp8(gate_up))
        return self.down_proj(self.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, layer_idx: int, biases: tuple[bool, bool, bool], tp: TensorParallelGroup,
        ops: Ops,
    ) -> None:
        super().__init__()
        qkv_bias, o_bias, mlp_bias = biases
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias, o_bias, tp, ops)
        self.mlp = LlamaMLP(config, mlp_bias, tp, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, residual stream before it); the next norm adds them."""
        # --quantize fp8: the norms write the quantized input of qkv_proj and gate_up_proj.
        fp8 = self.self_attn.qkv_proj.quantized
        if residual is None:
            hidden, residual = self.input_layernorm(hidden, fp8=fp8), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual, fp8=fp8)
        hidden = self.self_attn(hidden, cos, sin, kv_cache, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual, fp8=fp8)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: PretrainedConfig, biases: tuple[bool, bool, bool], tp: TensorParallelGroup, ops: Ops
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, biases, tp, ops) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], attn: AttentionMetadata
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)  # gathered once, shared by every layer
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Old exports carry the rotary buffer; we compute it from the config.
    skipped_weight_patterns: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    @classmethod
    def biases(cls, config: PretrainedConfig) -> tuple[bool, bool, bool]:
        """Whether (q/k/v, o, MLP) projections carry a bias."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup, ops: Ops = TORCH_OPS) -> None:
        super().__init__(config, tp, ops)
        self.model = LlamaModel(config, self.biases(config), tp, ops)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        attention = self.model.layers[0].self_attn.qkv_proj
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = attention.num_kv_heads
        self.head_dim = attention.head_dim
        self.vocab_size = config.vocab_size

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def weight_skip_patterns(self) -> tuple[str, ...]:
        # A tied checkpoint may still store lm_head.weight: a copy of the embedding.
        return self.skipped_weight_patterns + (("lm_head.",) if self.tied else ())

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], attn: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window (config.sliding_window) and no biases."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on q/k/v (never on o) and per-layer sliding windows."""

    @classmethod
    def biases(cls, config: PretrainedConfig) -> tuple[bool, bool, bool]:
        return True, False, False
