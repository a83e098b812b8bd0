"""The interface every model family offers the shard runtime."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.attention import AttentionMetadata
from shardgen.shard.layers.ops import TORCH_OPS, Ops
from shardgen.shard.weights import TensorSlice, load_weights


class CausalLM(nn.Module):
    """A decoder-only language model holding this rank's slice of the weights.

    Attributes the runtime reads to size the KV cache: num_layers, num_kv_heads (KV heads
    held by THIS rank, after splitting or replication), head_dim; and vocab_size (the
    width of compute_logits' output). `ops` are the hot-path ops its layers were built
    with (shard/layers/ops.py): the runtime captures CUDA graphs only when they are
    graph-safe.
    """

    config: PretrainedConfig
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    # Checkpoint module name -> (fused parameter module, shard id); see shardgen.shard.weights.
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {}
    # Substrings of checkpoint tensor names that hold nothing to load.
    skipped_weight_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.ops = ops

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] (after the final norm) of the step's T new tokens.

        input_ids, positions: [T] int64, every sequence's new tokens flattened in order;
        kv_caches: one (k_cache, v_cache) per layer, written at attn.slot_mapping.
        """
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab_size] float32 logits of the full vocabulary, on every rank."""
        raise NotImplementedError

    def weight_skip_patterns(self) -> tuple[str, ...]:
        """Checkpoint names to ignore for this instance (a family may add config-dependent ones)."""
        return self.skipped_weight_patterns

    def load_weights(self, tensors: Iterable[tuple[str, TensorSlice]]) -> None:
        """Fills every parameter from (checkpoint name, lazy tensor) pairs; see shard.weights."""
        load_weights(
            self,
            tensors,
            packed_modules_mapping=self.packed_modules_mapping,
            skipped_weight_patterns=self.weight_skip_patterns(),
        )
