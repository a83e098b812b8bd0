"""The physical paged KV store of one shard.

The router owns block accounting (which request has which blocks); the shard owns the
memory. Every layer has a key and a value tensor of shape
`[num_blocks, block_size, num_kv_heads, head_dim]` (this rank's KV heads), and token slot
`s` lives at `[s // block_size, s % block_size]`. All layers share one allocation so the
whole cache is a single block of device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_cache_dtype(name: str) -> torch.dtype | None:
    """The dtype `--kv-cache-dtype` names (shard/config.py's KV_CACHE_DTYPES); None for
    "auto": the model's own."""
    return torch.float8_e4m3fn if name == "fp8" else None


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one KV block across all layers of this rank."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes that one block takes over all layers, keys and values together."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    def blocks_for_bytes(self, num_bytes: int) -> int:
        """How many whole blocks fit in `num_bytes`."""
        return max(num_bytes, 0) // self.bytes_per_block


class PagedKVCache:
    """Keys and values of every layer, addressed by slot.

    The model's attention layers write and read the per-layer tensors directly
    (`layers`); `write` and `read` are the same addressing for tests and probes.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least 1 block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self._storage = torch.zeros(
            (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim),
            dtype=spec.dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self._storage[layer, 0], self._storage[layer, 1]) for layer in range(spec.num_layers)]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `key`/`value` [T, num_kv_heads, head_dim] of layer `layer` at `slots` [T]."""
        k_cache, v_cache = self.layers[layer]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = key
        v_cache.view(-1, *v_cache.shape[2:])[slots] = value

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [T, num_kv_heads, head_dim] of layer `layer` at `slots` [T]."""
        k_cache, v_cache = self.layers[layer]
        return (k_cache.reshape(-1, *k_cache.shape[2:])[slots],
                v_cache.reshape(-1, *v_cache.shape[2:])[slots])
