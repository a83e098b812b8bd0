"""Warm-up: the shape of the step it runs and how many KV blocks it allocates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shardgen.proto import generate_pb2
from shardgen.shard.interceptor import CapacityError, NotReadyError
from shardgen.shard.models import load_model
from shardgen.shard.runner import MemoryPolicy, ModelFacts, ModelRunner
from shardgen.shard.warmup import WarmupShape, required_blocks

from shard_rpc import STORIES

CPU = torch.device("cpu")


@pytest.mark.parametrize("prefill, batch, total, positions, lengths", [
    (64, 4, 128, 512, [61, 1, 1, 1]),        # the longest sequence allowed, plus one row each
    (300, 2, 128, 512, [128, 128]),          # capped by max_total_tokens per sequence
    (300, 4, 1000, 100, [100, 67, 67, 66]),  # capped by the model's positions
    (3, 8, 128, 512, [1, 1, 1]),             # never more sequences than tokens
    (10, 1, 128, 512, [10]),
])
def test_the_warmup_step_fills_the_prefill_budget(prefill: int, batch: int, total: int,
                                                  positions: int, lengths: list[int]) -> None:
    shape = WarmupShape.of(prefill, batch, total, positions)
    assert shape.lengths == lengths
    assert all(0 < n <= min(total, positions) for n in shape.lengths)


def test_warmup_sequences_share_blocks_past_block_0() -> None:
    sequences = WarmupShape.of(40, 2, 64, 512).sequences(block_size=16, vocab_size=32)
    assert [len(s.input_ids) for s in sequences] == [39, 1]
    assert sequences[0].blocks == [1, 2, 3] and min(sequences[0].slots) == 16
    assert max(max(s.input_ids) for s in sequences) < 32
    assert required_blocks(64, 16) == 5 and required_blocks(65, 16) == 6


@pytest.fixture(scope="module")
def model() -> Iterator[torch.nn.Module]:
    yield load_model(STORIES, dtype=torch.float32, device=CPU)


def _runner(model: torch.nn.Module, **memory: int | None) -> ModelRunner:
    policy = dict(block_size=16, kv_cache_bytes=1 << 20, num_blocks=None, cuda_memory_fraction=0.9)
    policy.update(memory)
    return ModelRunner(model, ModelFacts.read(STORIES, model), MemoryPolicy(**policy),  # type: ignore[arg-type]
                       device=CPU, dtype=torch.float32)


WARMUP = generate_pb2.WarmupRequest(max_batch_prefill_tokens=64, max_batch_size=4,
                                    max_total_tokens=128)


def test_cpu_blocks_come_from_kv_cache_bytes(model: torch.nn.Module) -> None:
    runner = _runner(model, kv_cache_bytes=1 << 20)
    with pytest.raises(NotReadyError):
        runner.decode(generate_pb2.DecodeRequest())
    response = runner.warmup(WARMUP)
    # stories260K: 5 layers x 4 KV heads x head_dim 8, float32: 20480 bytes per block of 16.
    assert response.num_blocks == (1 << 20) // 20480 and response.block_size == 16
    assert runner.cache is not None and runner.cache.num_blocks == response.num_blocks


def test_num_blocks_overrides_the_sizing(model: torch.nn.Module) -> None:
    assert _runner(model, num_blocks=3).warmup(WARMUP).num_blocks == 3


def test_a_cache_too_small_for_one_sequence_is_an_error(model: torch.nn.Module) -> None:
    runner = _runner(model, kv_cache_bytes=5 * 20480)  # 5 blocks; 128 tokens need 1 + 8
    with pytest.raises(CapacityError, match="fits 5 blocks of 16 tokens, fewer than the 9"):
        runner.warmup(WARMUP)
