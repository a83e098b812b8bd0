"""`--kv-cache-dtype fp8`: the shard stores keys and values as float8 e4m3 (a quarter of
stories260K's float32 bytes per block) and generates through real gRPC.

fp8 rounds every key and value to 3 mantissa bits, so tokens are not transformers' any
more in general: on this tiny model (head_dim 8) the first token's log-probabilities move
by up to ~0.25 and one prompt's greedy tokens part from transformers' after 10. What is
pinned: the cache's dtype and size, the model's dtype in Info, a confident prompt's greedy
tokens, and log-probabilities near the float32 cache's.
"""

from __future__ import annotations

import pytest
import torch

from shard_rpc import MiniRouter, Reference, running_shard
from shardgen.proto import generate_pb2

PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They saw a big dog", "The cat"]
WARMUP = generate_pb2.WarmupRequest(max_batch_prefill_tokens=64, max_batch_size=4,
                                    max_total_tokens=128)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def first_logprobs(flags: tuple[str, ...], prompts: list[list[int]]) -> tuple[list[float], MiniRouter]:
    with running_shard("--num-blocks", "64", *flags) as shard:
        response = shard.stub.Warmup(WARMUP)
        router = MiniRouter(shard.stub, response.num_blocks)
        generations = router.prefill(1, [router.request(i, p, max_new_tokens=40)
                                         for i, p in enumerate(prompts)])
        router.run_to_completion()
        return [g.tokens.logprobs[0] for g in generations], router


def test_the_cache_holds_fp8_and_the_model_keeps_its_dtype() -> None:
    with running_shard("--kv-cache-bytes", str(1 << 20), "--kv-cache-dtype", "fp8") as shard:
        response = shard.stub.Warmup(WARMUP)
        # 5 layers x 4 KV heads x head_dim 8 x 16 tokens x (K, V): 5120 bytes per block in fp8.
        assert response.num_blocks == (1 << 20) // 5120
        assert shard.runner.cache is not None
        assert shard.runner.cache.layers[0][0].dtype == torch.float8_e4m3fn
        assert shard.stub.Info(generate_pb2.InfoRequest()).dtype == "float32"


def test_fp8_generation_stays_near_the_float32_cache(reference: Reference) -> None:
    prompts = [reference.encode(text) for text in PROMPTS]
    exact, _ = first_logprobs((), prompts)
    rounded, router = first_logprobs(("--kv-cache-dtype", "fp8"), prompts)
    assert rounded != exact  # the cache did round
    assert max(abs(a - b) for a, b in zip(exact, rounded)) < 0.35
    assert router.sequences[0].generated == reference.greedy(prompts[0], 40)
    assert all(len(router.sequences[i].generated) == 40 for i in range(len(prompts)))
