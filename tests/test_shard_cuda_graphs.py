"""CUDA graphs (decode and varlen): buckets, padding, and (GPU) the same tokens as the eager
torch path.

The static-buffer path runs eagerly on CPU too (no capture): a step padded to its bucket
must give its real rows exactly the logits (decode) or hidden states (varlen) of the
unpadded step, even when the padding held a larger, earlier step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_model_harness import save_random_model
from transformers import LlamaConfig

from shardgen.proto import generate_pb2
from shardgen.shard.batch import DecodeBatch, NewSequence, StoppingParams, build_step
from shardgen.shard.cuda_graphs import DecodeGraphs, GraphPolicy, PrefillGraphs, bucket_sizes, token_bucket_sizes
from shardgen.shard.kv_cache import KVCacheSpec, PagedKVCache
from shardgen.shard.models import load_model
from shardgen.shard.runner import MemoryPolicy, ModelFacts, ModelRunner
from shardgen.shard.sampling import SamplingParams

CPU = torch.device("cpu")
# The Triton kernels run on CPU inside Triton's interpreter only.
BACKENDS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
BLOCK = 4
CONFIG = LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=211, max_position_embeddings=256,
                     initializer_range=0.2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("graphs")
    save_random_model(path, CONFIG)
    return path


def test_buckets_are_powers_of_two_then_the_maximum() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_token_buckets_pad_a_step_by_a_third_at_most() -> None:
    assert token_bucket_sizes(8) == []
    assert token_bucket_sizes(16) == [16]
    assert token_bucket_sizes(100) == [16, 24, 32, 48, 64, 96, 100]
    assert token_bucket_sizes(1024)[-3:] == [512, 768, 1024]
    sizes = token_bucket_sizes(4096)
    assert all(b / a <= 1.5 for a, b in zip(sizes, sizes[1:]))


def test_a_policy_needs_a_positive_batch() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        GraphPolicy(enabled=True, max_batch_size=0)


def test_graphs_are_refused_without_cuda_and_triton(model_path) -> None:
    model = load_model(model_path, dtype=torch.float32, device=CPU)
    assert not GraphPolicy.default_for(model, CPU).enabled
    with pytest.raises(ValueError, match="need a CUDA device and the Triton kernels, got cpu with the torch"):
        ModelRunner(model, ModelFacts.read(model_path, model), MemoryPolicy(BLOCK, 1 << 20, None, 0.9),
                    device=CPU, dtype=torch.float32, graphs=GraphPolicy(enabled=True))


def _sequence(rid: int, length: int, blocks: list[int]) -> NewSequence:
    tokens = [(7 * rid + 3 * p) % CONFIG.vocab_size for p in range(length)]
    return NewSequence(rid, tokens, blocks, [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)],
                       0, length, SamplingParams(), StoppingParams(50, True, frozenset()), False, 0, 0)


def _decode_batch(lengths: list[int], first_block: int) -> DecodeBatch:
    """Rows whose prompts are in the cache (written by a prefill) and that decode next."""
    sequences, block = [], first_block
    for rid, length in enumerate(lengths):
        count = length // BLOCK + 1
        sequences.append(_sequence(rid, length, list(range(block, block + count))))
        block += count
    batch = DecodeBatch.from_new(0, sequences, CONFIG.vocab_size, CPU)
    batch.advance(np.arange(len(lengths)) + 5, torch.arange(len(lengths)) + 5)
    return batch


@torch.inference_mode()
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_steps_give_the_real_rows_the_unpadded_logits(model_path, backend: str) -> None:
    model = load_model(model_path, dtype=torch.float32, device=CPU, kernel_backend=backend)
    cache = PagedKVCache(KVCacheSpec(model.num_layers, BLOCK, model.num_kv_heads, model.head_dim,
                                     torch.float32), 64, CPU)
    torch.manual_seed(0)
    for k, v in cache.layers:  # stands in for earlier prefills: any content will do
        k.normal_()
        v.normal_()
    graphs = DecodeGraphs(model, cache, max_batch_size=8, table_width=12)
    large, small = _decode_batch([9, 5, 14, 7, 3], 1), _decode_batch([6, 10, 2], 30)
    for batch in (large, small):  # the small step's padding rows held the large one's rows
        inputs = build_step(batch, [], BLOCK, CPU, sampled=batch)
        bucket = graphs.bucket_for(inputs)
        assert bucket == {5: 8, 3: 4}[len(batch)]
        before = [t.clone() for layer in cache.layers for t in layer]
        graphs._static.fill(inputs, bucket)
        padded_hidden, padded_logits = graphs._forward(bucket)
        # Padding rows wrote block 0 and nothing else beside the real rows' slots.
        untouched = sorted(set(range(1, 64)) - set((batch.decode_slots(BLOCK) // BLOCK).tolist()))
        after = [t for layer in cache.layers for t in layer]
        assert all(torch.equal(b[untouched], a[untouched]) for b, a in zip(before, after))
        assert not all(torch.equal(b[0], a[0]) for b, a in zip(before, after))
        hidden = model(inputs.input_ids, inputs.positions, cache.layers, inputs.attn)
        rows = len(batch)
        torch.testing.assert_close(padded_logits[:rows], model.compute_logits(hidden), atol=1e-5, rtol=1e-5)
        assert not padded_hidden[rows:].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_varlen_steps_give_the_real_rows_the_unpadded_hidden_states(model_path, backend: str) -> None:
    """Prompts, a chunk after a cached prefix and decodes in one step, padded to a token
    bucket with empty sequence slots after them; then a smaller step over the stale
    padding of the first."""
    model = load_model(model_path, dtype=torch.float32, device=CPU, kernel_backend=backend)
    cache = PagedKVCache(KVCacheSpec(model.num_layers, BLOCK, model.num_kv_heads, model.head_dim,
                                     torch.float32), 64, CPU)
    torch.manual_seed(0)
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    graphs = PrefillGraphs(model, cache, max_tokens=48, max_seqs=6, table_width=12)
    decodes = _decode_batch([9, 5], 40)
    chunk = _sequence(7, 14, [30, 31, 32, 33])
    chunk = NewSequence(**{**chunk.__dict__, "start": 6, "slots": chunk.slots[6:]})   # 6 tokens cached
    steps = [(decodes, [_sequence(5, 11, [1, 2, 3]), chunk]), (None, [_sequence(6, 7, [20, 21])])]
    for running, new in steps:
        inputs = build_step(running, new, BLOCK, CPU, sampled=None)
        tokens = inputs.input_ids.shape[0]
        bucket = graphs.bucket_for(inputs)
        assert bucket == {2 + 11 + 8: 24, 7: 16}[tokens]
        reference_cache = [tuple(t.clone() for t in layer) for layer in cache.layers]
        expected = model(inputs.input_ids, inputs.positions, reference_cache, inputs.attn)
        graphs._static.fill(inputs, bucket, graphs._seqs(bucket))
        hidden = graphs._forward(bucket)[:tokens]
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
        # The real rows wrote what the unpadded step wrote; padding wrote block 0 only.
        for (k, v), (k_ref, v_ref) in zip(cache.layers, reference_cache):
            torch.testing.assert_close(k[1:], k_ref[1:])
            torch.testing.assert_close(v[1:], v_ref[1:])


def test_varlen_steps_that_do_not_fit_a_graph_run_eagerly(model_path) -> None:
    model = load_model(model_path, dtype=torch.float32, device=CPU)
    cache = PagedKVCache(KVCacheSpec(model.num_layers, BLOCK, model.num_kv_heads, model.head_dim,
                                     torch.float32), 64, CPU)
    graphs = PrefillGraphs(model, cache, max_tokens=32, max_seqs=2, table_width=4)
    fits = [_sequence(1, 10, [1, 2, 3])]
    assert graphs.bucket_for(build_step(None, fits, BLOCK, CPU, sampled=None)) == 16
    too_long = [_sequence(1, 16, [1, 2, 3, 4]), _sequence(2, 17, [5, 6, 7, 8, 9])]
    assert graphs.bucket_for(build_step(None, too_long, BLOCK, CPU, sampled=None)) is None
    too_many = [_sequence(i, 3, [i]) for i in range(1, 4)]
    assert graphs.bucket_for(build_step(None, too_many, BLOCK, CPU, sampled=None)) is None
    too_wide = [_sequence(1, 18, [1, 2, 3, 4, 5])]
    assert graphs.bucket_for(build_step(None, too_wide, BLOCK, CPU, sampled=None)) is None
    assert PrefillGraphs(model, cache, max_tokens=8, max_seqs=2, table_width=4).bucket_for(
        build_step(None, fits, BLOCK, CPU, sampled=None)) is None


def test_steps_that_do_not_fit_a_graph_run_eagerly(model_path) -> None:
    model = load_model(model_path, dtype=torch.float32, device=CPU)
    cache = PagedKVCache(KVCacheSpec(model.num_layers, BLOCK, model.num_kv_heads, model.head_dim,
                                     torch.float32), 64, CPU)
    graphs = DecodeGraphs(model, cache, max_batch_size=4, table_width=3)
    assert graphs.bucket_for(build_step(_decode_batch([5, 3, 2], 1), [], BLOCK, CPU,
                                        sampled=_decode_batch([5, 3, 2], 1))) == 4
    too_many = _decode_batch([3] * 5, 1)
    assert graphs.bucket_for(build_step(too_many, [], BLOCK, CPU, sampled=too_many)) is None
    too_wide = _decode_batch([12], 1)  # 4 blocks: 12 tokens and the next one
    assert graphs.bucket_for(build_step(too_wide, [], BLOCK, CPU, sampled=too_wide)) is None
    prompt = [_sequence(9, 6, [20, 21])]
    assert graphs.bucket_for(build_step(None, prompt, BLOCK, CPU, sampled=None)) is None


def test_an_unchanged_batch_feeds_its_sampled_ids_from_the_device() -> None:
    batch = _decode_batch([5, 3], 1)
    inputs = build_step(batch, [], BLOCK, CPU, sampled=batch)
    assert inputs.input_ids is batch.last_tokens_device
    assert batch.select([1, 0]).last_tokens_device is None
    mixed = build_step(batch, [_sequence(7, 3, [40])], BLOCK, CPU, sampled=batch)
    assert mixed.input_ids.tolist() == [5, 6] + [7 * 7 + 3 * p for p in range(3)]


# ---------------------------------------------------------------------------- on a GPU

class _Driver:
    """The router's part, in-process: blocks from a free list, Prefill then Decode to the end."""

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner = runner
        self.free = list(range(num_blocks - 1, 0, -1))
        self.blocks: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.batch: generate_pb2.CachedBatch | None = None

    def _grow(self, rid: int, tokens: int) -> list[int]:
        new = [self.free.pop() for _ in range(-(-tokens // BLOCK) - len(self.blocks[rid]))]
        self.blocks[rid] += new
        return new

    def prefill(self, prompts: dict[int, tuple[list[int], int]]) -> None:
        requests = []
        for rid, (prompt, max_new) in prompts.items():
            self.blocks[rid], self.length[rid], self.tokens[rid] = [], len(prompt), []
            self._grow(rid, len(prompt))
            requests.append(generate_pb2.Request(
                id=rid, input_ids=prompt, blocks=self.blocks[rid],
                slots=[self.blocks[rid][p // BLOCK] * BLOCK + p % BLOCK for p in range(len(prompt))],
                parameters=generate_pb2.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                                   repetition_penalty=1.0),
                stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=max_new,
                                                                            ignore_eos_token=True)))
        self._absorb(self.runner.prefill(generate_pb2.PrefillRequest(
            batch=generate_pb2.Batch(id=1, requests=requests))))

    def _absorb(self, response: generate_pb2.PrefillResponse | generate_pb2.DecodeResponse) -> None:
        for generation in response.generations:
            self.tokens[generation.request_id] += list(generation.tokens.ids)
            self.length[generation.request_id] += 1
        self.batch = response.batch if response.HasField("batch") else None

    def run(self) -> dict[int, list[int]]:
        while self.batch is not None:
            extensions = []
            for rid in self.batch.request_ids:
                new = self._grow(rid, self.length[rid])
                if new:
                    extensions.append(generate_pb2.BlockTableExtension(request_id=rid, blocks=new))
            self._absorb(self.runner.decode(generate_pb2.DecodeRequest(
                batches=[self.batch], block_extensions=extensions)))
        return self.tokens


def _greedy_tokens(path, backend: str, graphs: bool) -> tuple[dict[int, list[int]], ModelRunner]:
    device = torch.device("cuda", 0)
    model = load_model(path, dtype=torch.float32, device=device, kernel_backend=backend)
    runner = ModelRunner(model, ModelFacts.read(path, model), MemoryPolicy(BLOCK, 0, 512, 0.5),
                         device=device, dtype=torch.float32, graphs=GraphPolicy(graphs, max_batch_size=8))
    runner.warmup(generate_pb2.WarmupRequest(max_batch_prefill_tokens=256, max_batch_size=8,
                                             max_total_tokens=128))
    driver = _Driver(runner, 512)
    lengths, max_new = [3, 17, 30, 8, 21, 12], [40, 9, 25, 3, 33, 17]  # the batch shrinks 6 -> 1
    driver.prefill({rid: ([(11 * rid + 5 * p) % CONFIG.vocab_size for p in range(n)], m)
                    for rid, (n, m) in enumerate(zip(lengths, max_new))})
    return driver.run(), runner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_with_graphs_generates_the_torch_paths_greedy_tokens(model_path) -> None:
    want, _ = _greedy_tokens(model_path, "torch", graphs=False)
    got, runner = _greedy_tokens(model_path, "triton", graphs=True)
    assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4, 8]
    assert got == want
