"""Warm-up: the shape of the step it runs, how many KV blocks it allocates, and (CUDA) the
kernels it loads so that no step waits for a first use while serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernel_env import gpu_only
from test_model_harness import save_random_model
from transformers import LlamaConfig

from shardgen.proto import generate_pb2
from shardgen.shard.interceptor import CapacityError, NotReadyError
from shardgen.shard.layers.linear import ParallelLinear
from shardgen.shard.models import load_model
from shardgen.shard.runner import MemoryPolicy, ModelFacts, ModelRunner
from shardgen.shard.sampling import SamplingBatch, SamplingParams, sample
from shardgen.shard.warmup import WarmupShape, gemm_row_counts, required_blocks, warm_projections

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


def test_a_limit_that_may_shrink_gets_the_blocks_there_are(model: torch.nn.Module) -> None:
    runner = _runner(model, kv_cache_bytes=5 * 20480)
    request = generate_pb2.WarmupRequest()
    request.CopyFrom(WARMUP)
    request.max_total_tokens_may_shrink = True
    assert runner.warmup(request).num_blocks == 5  # the router then serves 4 x 16 tokens


def test_projections_warm_at_every_decode_batch_and_full_prefill_size() -> None:
    assert gemm_row_counts(4, 10) == [1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert gemm_row_counts(4, 3) == [1, 2, 3, 4, 5, 6, 7]


def test_each_distinct_projection_runs_once_per_row_count(model: torch.nn.Module,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []
    matmul = ParallelLinear.matmul

    def spy(self: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = matmul(self, x, bias)
        assert out.shape == (x.shape[0], self.weight.shape[0])
        calls.append((tuple(self.weight.shape), x.shape[0]))
        return out

    monkeypatch.setattr(ParallelLinear, "matmul", spy)
    # stories260K: 5 layers of q/k/v, o, gate/up and down projections; o is as wide as it is
    # tall, the other three differ.
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, ParallelLinear)}
    assert len(shapes) == 4
    assert warm_projections(model, [3, 1, 7, 3], torch.float32) == 4
    assert sorted(calls) == sorted((shape, rows) for shape in shapes for rows in (1, 3, 7))


@gpu_only
def test_after_warmup_no_step_size_waits_for_a_kernel_to_load(tmp_path) -> None:
    """cuBLAS loads a kernel at its first use once the device is idle, and Triton compiles a
    variant at its first launch: either would let the work queued before finish meanwhile."""
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
    save_random_model(tmp_path, config)
    cuda = torch.device("cuda")
    model = load_model(tmp_path, dtype=torch.bfloat16, device=cuda)
    memory = MemoryPolicy(block_size=16, kv_cache_bytes=0, num_blocks=None, cuda_memory_fraction=0.5)
    runner = ModelRunner(model, ModelFacts.read(tmp_path, model), memory, device=cuda, dtype=torch.bfloat16)
    rows, budget = 24, 300
    runner.warmup(generate_pb2.WarmupRequest(max_batch_prefill_tokens=budget, max_batch_size=rows,
                                             max_total_tokens=512))
    busy = torch.randn(8192, 8192, device=cuda, dtype=torch.bfloat16)
    busy @ busy
    torch.cuda.synchronize()
    for _ in range(100):   # ~150 ms of matmuls queued ahead of the calls below
        busy @ busy
    queued = torch.cuda.Event()
    queued.record()
    warm_projections(model, gemm_row_counts(rows, budget), torch.bfloat16)
    hidden = torch.zeros((rows, config.hidden_size), dtype=torch.bfloat16, device=cuda)
    index = torch.zeros(rows, dtype=torch.int64, device=cuda)
    for n in range(1, rows + 1):
        logits = model.compute_logits(hidden[:n])
        sample(logits, SamplingBatch([SamplingParams()] * n, config.vocab_size, cuda), index[:n], index[:n])
    assert not queued.query(), "a call waited for the device: its kernel was not loaded at warm-up"
    torch.cuda.synchronize()
