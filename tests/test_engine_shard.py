"""The engine over real gRPC against a real shard process serving stories260K on CPU.

One shard process (block size 4, so that block boundaries come often) serves the whole
module; each test builds its own client, block manager and engine over it. The router may
use fewer blocks than the shard holds, which is how the tiny-cache tests get their
preemptions. Greedy tokens are compared with transformers' LlamaForCausalLM run on the same
checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_engine_fake_shard import uds_path

from shardgen.router.block_manager import BlockManager
from shardgen.router.client import ShardClient, connect_and_warm_up
from shardgen.router.engine import Engine, RequestHandle, SchedulerConfig
from shardgen.router.metrics import Metrics
from shardgen.router.requests import (FinishReason, GenerationError, GenerationRequest,
                                      SamplingParams, StoppingParams, TokenEvent)

MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
BLOCK_SIZE = 4
SHARD_BLOCKS = 400

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} is missing"),
]

# stories260K's tokenizer on: "Once upon a time", "Tom and Lily went to the park",
# "One day, a little bird", "The sun was shining and the cat". Greedy from the third
# reaches EOS (id 1) after 218 tokens; the others run on past 300.
PROMPTS = [
    [1, 403, 407, 261, 378],
    [1, 274, 287, 269, 317, 263, 377, 267, 265, 282, 295, 433],
    [1, 385, 328, 432, 261, 376, 268, 315, 418],
    [1, 291, 262, 379, 286, 262, 415, 271, 299, 269, 265, 280, 294],
]


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = uds_path(tmp_path_factory.mktemp("shard"))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "shardgen.shard", "--model-id", str(MODEL), "--uds-path", path,
         "--device", "cpu", "--block-size", str(BLOCK_SIZE), "--num-blocks", str(SHARD_BLOCKS),
         "--log-level", "warning"], env=env)
    try:
        yield path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@functools.lru_cache(maxsize=None)
def transformers_greedy(prompt: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' LlamaForCausalLM on the checkpoint, EOS ignored."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model = _reference_model(LlamaForCausalLM)
    inputs, past, generated = torch.tensor([list(prompt)]), None, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            output = model(inputs, past_key_values=past, use_cache=True)
            past = output.past_key_values
            generated.append(int(output.logits[0, -1].argmax()))
            inputs = torch.tensor([[generated[-1]]])
    return generated


@functools.lru_cache(maxsize=1)
def _reference_model(model_class: type) -> object:
    return model_class.from_pretrained(MODEL).eval()


@contextlib.asynccontextmanager
async def engine_on(shard_path: str, *, num_blocks: int = SHARD_BLOCKS, num_shard: int = 1,
                    metrics: Metrics | None = None,
                    **config: object) -> AsyncIterator[tuple[Engine, BlockManager]]:
    client, _, shard_blocks, block_size = await connect_and_warm_up(
        shard_path, num_shard, max_batch_prefill_tokens=256, max_batch_size=32,
        max_total_tokens=256, timeout_s=60)
    assert block_size == BLOCK_SIZE and shard_blocks == SHARD_BLOCKS
    scheduler = SchedulerConfig(**config)
    blocks = BlockManager(num_blocks, block_size,
                          enable_prefix_caching=scheduler.enable_prefix_caching)
    engine = Engine(client, scheduler, blocks, metrics=metrics)
    await engine.start()
    try:
        yield engine, blocks
    finally:
        await engine.stop(drain_timeout_s=1.0)
        await client.close()


def greedy(prompt: list[int], max_new_tokens: int, **fields: object) -> GenerationRequest:
    return GenerationRequest(input_ids=list(prompt), sampling=SamplingParams(),
                             stopping=StoppingParams(max_new_tokens, ignore_eos_token=True),
                             **fields)


def sampled(prompt: list[int], max_new_tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(
        input_ids=list(prompt),
        sampling=SamplingParams(do_sample=True, temperature=0.9, top_k=40, seed=seed),
        stopping=StoppingParams(max_new_tokens, ignore_eos_token=True))


async def token_ids(handle: RequestHandle) -> list[int]:
    events = [event async for event in handle]
    assert isinstance(events[-1], TokenEvent) and events[-1].finish_reason is not None
    return [event.id for event in events if isinstance(event, TokenEvent)]


async def all_tokens_then_settled(engine: Engine, blocks: BlockManager,
                                  handles: list[RequestHandle]) -> list[list[int]]:
    """Every handle's tokens; then the engine goes idle with every block free."""
    results = await asyncio.gather(*(token_ids(h) for h in handles))
    await settle(engine)
    assert blocks.num_used_blocks == 0
    blocks.check_invariants()
    return results


async def settle(engine: Engine) -> None:
    for _ in range(200):
        if engine.running_size == 0 and engine.queue_size == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)


def test_greedy_tokens_equal_transformers_in_one_batch(shard_path):
    async def main() -> list[list[int]]:
        async with engine_on(shard_path) as (engine, _):
            handles = [engine.submit(greedy(p, 24)) for p in PROMPTS]
            return await asyncio.gather(*(token_ids(h) for h in handles))
    results = asyncio.run(main())
    for prompt, tokens in zip(PROMPTS, results):
        assert tokens == transformers_greedy(tuple(prompt), 24)


def test_the_shard_stops_at_eos_and_the_stream_says_so(shard_path):
    async def main() -> list[TokenEvent]:
        async with engine_on(shard_path) as (engine, _):
            request = greedy(PROMPTS[2], 300)
            request.stopping = StoppingParams(300)
            return [event async for event in engine.submit(request)]
    events = asyncio.run(main())
    assert [event.id for event in events] == transformers_greedy(tuple(PROMPTS[2]), 218)
    assert events[-1].finish_reason is FinishReason.EOS_TOKEN and events[-1].id == 1


def test_many_concurrent_requests_complete_and_equal_prompts_equal_tokens(shard_path):
    async def main() -> list[list[int]]:
        async with engine_on(shard_path, max_batch_prefill_tokens=32) as (engine, blocks):
            handles = [engine.submit(greedy(PROMPTS[i % 4], 16)) for i in range(24)]
            return await all_tokens_then_settled(engine, blocks, handles)
    results = asyncio.run(main())
    for i, tokens in enumerate(results):
        assert tokens == transformers_greedy(tuple(PROMPTS[i % 4]), 16)


def test_chunked_prefill_gives_the_tokens_of_an_unchunked_one(shard_path):
    long_prompt = PROMPTS[3] + PROMPTS[1][1:] + PROMPTS[2][1:] + PROMPTS[0][1:]

    async def generate(budget: int) -> list[int]:
        async with engine_on(shard_path, max_batch_prefill_tokens=budget,
                             enable_prefix_caching=False) as (engine, _):
            running = engine.submit(greedy(PROMPTS[0], 30))
            await running.__anext__()
            tokens = await token_ids(engine.submit(greedy(long_prompt, 12)))
            [event async for event in running]
            return tokens

    async def main() -> tuple[list[int], list[int]]:
        return await generate(7), await generate(256)
    chunked, whole = asyncio.run(main())
    assert chunked == whole == transformers_greedy(tuple(long_prompt), 12)


def test_a_repeated_prompt_reuses_its_cached_prefix(shard_path):
    async def main() -> tuple[list[int], list[int], int]:
        async with engine_on(shard_path) as (engine, blocks):
            first = await token_ids(engine.submit(greedy(PROMPTS[3], 10)))
            second = await token_ids(engine.submit(greedy(PROMPTS[3], 10)))
            return first, second, blocks.prefix_hit_tokens_total
    first, second, hits = asyncio.run(main())
    assert first == second == transformers_greedy(tuple(PROMPTS[3]), 10)
    assert hits == 12   # 13 prompt tokens: 3 whole blocks reused, the last token computed


def test_cancel_frees_the_blocks_and_spares_the_others(shard_path):
    async def main() -> list[int]:
        async with engine_on(shard_path) as (engine, blocks):
            other = engine.submit(greedy(PROMPTS[1], 40))
            cancelled = engine.submit(greedy(PROMPTS[2], 200))
            for _ in range(3):
                await cancelled.__anext__()
            cancelled.cancel()
            assert [event async for event in cancelled] == []
            [tokens] = await all_tokens_then_settled(engine, blocks, [other])
            return tokens
    assert asyncio.run(main()) == transformers_greedy(tuple(PROMPTS[1]), 40)


def test_a_tiny_cache_preempts_yet_every_request_completes_correctly(shard_path):
    # 11 usable blocks (44 tokens) for 8 requests that each grow to 25-36 tokens: the
    # scheduler must preempt and recompute. Sampled requests check that a recomputed
    # request continues its seeded draws (generated_offset) exactly.
    requests = [(PROMPTS[i % 4], 20, i) for i in range(8)]

    metrics = Metrics()

    async def run(num_blocks: int) -> list[list[int]]:
        async with engine_on(shard_path, num_blocks=num_blocks, waiting_served_ratio=0.0,
                             metrics=metrics) as (engine, blocks):
            handles = [engine.submit(sampled(p, n, seed) if seed % 2 else greedy(p, n))
                       for p, n, seed in requests]
            return await all_tokens_then_settled(engine, blocks, handles)

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        tiny = await run(12)
        assert metrics.registry.get_sample_value("shardgen_preemptions_total") > 0
        return tiny, await run(SHARD_BLOCKS)
    tiny, roomy = asyncio.run(main())
    assert tiny == roomy
    for (prompt, n, seed), tokens in zip(requests, tiny):
        if seed % 2 == 0:
            assert tokens == transformers_greedy(tuple(prompt), n)


def test_a_request_the_shard_rejects_fails_alone_and_serving_goes_on(shard_path):
    async def main() -> list[int]:
        async with engine_on(shard_path, max_batch_size=1) as (engine, blocks):
            bad = engine.submit(greedy([1, 5000, 7], 4))
            queued = engine.submit(greedy(PROMPTS[0], 6))
            with pytest.raises(GenerationError, match="shard 0 failed Prefill"):
                [event async for event in bad]
            tokens = await token_ids(queued)
            await settle(engine)
            assert blocks.num_used_blocks == 0
            return tokens
    assert asyncio.run(main()) == transformers_greedy(tuple(PROMPTS[0]), 6)


def test_the_client_reaches_a_healthy_shard(shard_path):
    async def main() -> None:
        client = ShardClient(shard_path, 1)
        try:
            await client.wait_until_healthy(60)
            await client.health(deep=True)
        finally:
            await client.close()
    asyncio.run(main())
