"""Tensor-parallel layers and the torch reference ops of the model's hot path.

Layers: linear (column / merged / QKV / row parallel), embedding (vocab-parallel
embedding and LM head), norm, rotary, activation, attention. The ops re-exported here
are the CPU production path and the oracle that the Triton kernels of
shardgen.shard.kernels, which share their signatures, are tested against.
"""

from shardgen.shard.layers.activation import silu_and_mul
from shardgen.shard.layers.attention import AttentionMetadata, make_attention_metadata, paged_attention, write_kv
from shardgen.shard.layers.norm import fused_add_rms_norm, rms_norm
from shardgen.shard.layers.rotary import apply_rotary

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "fused_add_rms_norm",
    "make_attention_metadata",
    "paged_attention",
    "rms_norm",
    "silu_and_mul",
    "write_kv",
]
