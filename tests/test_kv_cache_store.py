"""The paged KV store: how much it allocates, and where a slot's keys and values live."""

from __future__ import annotations

import pytest
import torch

from shard_rpc import BLOCK_SIZE, MiniRouter, running_shard
from shardgen.shard.kv_cache import KVCacheSpec, PagedKVCache

CPU = torch.device("cpu")


def test_block_size_in_bytes_counts_keys_values_and_layers() -> None:
    spec = KVCacheSpec(num_layers=5, block_size=16, num_kv_heads=4, head_dim=8, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 5 * 16 * 4 * 8 * 4
    half = KVCacheSpec(5, 16, 4, 8, torch.bfloat16)
    assert half.bytes_per_block == spec.bytes_per_block // 2
    assert spec.blocks_for_bytes(1 << 20) == (1 << 20) // 20480 == 51
    assert spec.blocks_for_bytes(20479) == 0 and spec.blocks_for_bytes(-5) == 0


def test_allocation_has_one_key_and_value_tensor_per_layer() -> None:
    spec = KVCacheSpec(3, 4, 2, 8, torch.float32)
    cache = PagedKVCache(spec, num_blocks=10, device=CPU)
    assert cache.nbytes == 10 * spec.bytes_per_block
    assert cache.num_slots == 40
    assert len(cache.layers) == 3
    for k_cache, v_cache in cache.layers:
        assert k_cache.shape == v_cache.shape == (10, 4, 2, 8)
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
    with pytest.raises(ValueError, match="at least 1 block, got 0"):
        PagedKVCache(spec, 0, CPU)


def test_write_then_read_by_slot() -> None:
    spec = KVCacheSpec(2, 4, 2, 3, torch.float32)
    cache = PagedKVCache(spec, num_blocks=6, device=CPU)
    slots = torch.tensor([5, 6, 7, 8, 21])   # block 1 offsets 1..3, block 2 offset 0, block 5 offset 1
    key = torch.randn(5, 2, 3)
    value = torch.randn(5, 2, 3)
    cache.write(1, slots, key, value)
    read_key, read_value = cache.read(1, slots)
    assert torch.equal(read_key, key) and torch.equal(read_value, value)
    k_cache, v_cache = cache.layers[1]
    assert torch.equal(k_cache[1, 1], key[0]) and torch.equal(k_cache[2, 0], key[3])
    assert torch.equal(v_cache[5, 1], value[4])
    # Nothing else was touched: not other slots, not the other layer.
    assert int((k_cache != 0).any(dim=(-1, -2)).sum()) == 5
    assert not cache.layers[0][0].any() and not cache.layers[0][1].any()


def test_a_prefill_writes_exactly_the_slots_it_was_given() -> None:
    with running_shard("--num-blocks", "12") as shard:
        router = MiniRouter(shard.stub, 12)
        from shardgen.proto import generate_pb2

        shard.stub.Warmup(generate_pb2.WarmupRequest(max_batch_prefill_tokens=32, max_batch_size=2,
                                                     max_total_tokens=64))
        cache = shard.runner.cache
        assert cache is not None
        before = [k.clone() for k, _ in cache.layers]
        request = router.request(1, list(range(1, 21)), max_new_tokens=1)
        router.prefill(1, [request])
        written = {slot for layer, (k_cache, _) in enumerate(cache.layers)
                   for slot in (k_cache != before[layer]).any(dim=(-1, -2)).flatten()
                   .nonzero().flatten().tolist()}
        assert written == set(request.slots)
        assert all(slot >= BLOCK_SIZE for slot in written)  # never block 0
