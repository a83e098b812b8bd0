"""A fake shard that checks the router's side of the contract, and the tests of the fake.

`FakeShard` serves the real gRPC service on a unix socket, in-process. Its "model" reads
its context back from a paged KV store exactly where the router's block tables say, so a
wrong block, slot, cache_len or generated_offset changes the tokens it produces (or fails
the call with the reason), while `reference_tokens` computes what a correct router gets.
Engine and client tests import it from here; the tests below show that the fake does catch
the mistakes it is meant to catch.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from shardgen.proto import generate_pb2, generate_pb2_grpc

VOCAB = 61
EOS = 2
BLOCK_SIZE = 4


def next_token(context: list[int], parameters: generate_pb2.NextTokenChooserParameters,
               draw: int) -> int:
    """The fake model: a function of the whole context and, when sampling, of (seed, draw)."""
    value = sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)
    if parameters.do_sample:
        value += (parameters.seed * 1_000_003 + draw * 7919) % 1_000_033
    return value % VOCAB


def reference_tokens(prompt: list[int], max_new_tokens: int, *, seed: int = 0,
                     do_sample: bool = False, ignore_eos: bool = False) -> list[int]:
    """The tokens a correct router gets for this request."""
    parameters = generate_pb2.NextTokenChooserParameters(do_sample=do_sample, seed=seed)
    sequence, generated = list(prompt), []
    while len(generated) < max_new_tokens:
        token = next_token(sequence, parameters, len(generated))
        sequence.append(token)
        generated.append(token)
        if token == EOS and not ignore_eos:
            break
    return generated


class ContractError(Exception):
    """The router sent something the contract forbids."""


@dataclass
class _RequestState:
    parameters: generate_pb2.NextTokenChooserParameters
    stopping: generate_pb2.StoppingCriteriaParameters
    top_n_tokens: int
    blocks: list[int]
    position: int          # position of the token computed next
    last_token: int
    generated: int         # generated_offset + tokens sampled here
    remaining: int         # max_new_tokens left


@dataclass
class ShardStats:
    prefill_calls: int = 0
    decode_calls: int = 0
    filter_calls: int = 0
    clear_calls: int = 0
    # (request id, cache_len, tokens computed) of every prompt chunk.
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    # Per step: the running requests decoded and the chunks computed.
    steps: list[tuple[list[int], list[tuple[int, int, int]]]] = field(default_factory=list)
    # generated_offset of every prompt request (non-zero after a preemption).
    generated_offsets: list[int] = field(default_factory=list)
    max_step_requests: int = 0


class FakeShard(generate_pb2_grpc.TextGenerationServiceServicer):
    """The shard side of the contract, over a paged KV store of (token, position) pairs."""

    def __init__(self, num_blocks: int, *, block_size: int = BLOCK_SIZE, rank: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.rank = rank
        self.kv: dict[int, tuple[int, int]] = {}
        self.requests: dict[int, _RequestState] = {}
        self.batches: dict[int, list[int]] = {}
        self.stats = ShardStats()
        self.step_delay_s = 0.0
        self.hang = False  # steps never answer (a peer died inside a collective)
        self._batch_ids = itertools.count(1_000_000)

    # ------------------------------------------------------------------ control RPCs

    async def Info(self, request, context):
        return generate_pb2.InfoResponse(model_id="fake", architecture="Fake", dtype="float32",
                                         device_type="cpu", block_size=self.block_size,
                                         world_size=1, rank=self.rank, vocab_size=VOCAB,
                                         max_position_embeddings=4096, eos_token_ids=[EOS])

    async def Health(self, request, context):
        return generate_pb2.HealthResponse()

    async def Warmup(self, request, context):
        return generate_pb2.WarmupResponse(num_blocks=self.num_blocks, block_size=self.block_size)

    async def ClearCache(self, request, context):
        self.stats.clear_calls += 1
        ids = [request.id] if request.HasField("id") else list(self.batches)
        for batch_id in ids:
            for request_id in self.batches.pop(batch_id, []):
                self.requests.pop(request_id, None)
        return generate_pb2.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        self.stats.filter_calls += 1
        keep = list(request.request_ids)
        members = self.batches.get(request.batch_id)
        if members is None or not set(keep) <= set(members):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"cannot keep {keep} of batch {request.batch_id}: {members}")
        for request_id in members:
            if request_id not in keep:
                self.requests.pop(request_id)
        self.batches[request.batch_id] = keep
        return generate_pb2.FilterBatchResponse(
            batch=generate_pb2.CachedBatch(id=request.batch_id, request_ids=keep))

    # ------------------------------------------------------------------ steps

    async def Prefill(self, request, context):
        self.stats.prefill_calls += 1
        await self._before_step()
        try:
            running = self._running(
                [request.cached_batch] if request.HasField("cached_batch") else [],
                request.block_extensions)
            self.stats.max_step_requests = max(self.stats.max_step_requests,
                                               len(running) + len(request.batch.requests))
            generations = [self._decode_one(request_id) for request_id in running]
            decoded = list(running)
            first_chunk = len(self.stats.chunks)
            for new in request.batch.requests:
                generation = self._prefill_one(new)
                generations.append(generation)
                if generation.tokens.ids and not generation.finish_reason:
                    running.append(new.id)
            self.stats.steps.append((decoded, self.stats.chunks[first_chunk:]))
        except ContractError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return generate_pb2.PrefillResponse(generations=generations,
                                            batch=self._new_batch(running, generations))

    async def Decode(self, request, context):
        self.stats.decode_calls += 1
        await self._before_step()
        try:
            running = self._running(request.batches, request.block_extensions)
            self.stats.max_step_requests = max(self.stats.max_step_requests, len(running))
            generations = [self._decode_one(request_id) for request_id in running]
            self.stats.steps.append((list(running), []))
        except ContractError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return generate_pb2.DecodeResponse(generations=generations,
                                           batch=self._new_batch(running, generations))

    async def _before_step(self) -> None:
        while self.hang:
            await asyncio.sleep(0.05)
        if self.step_delay_s:
            await asyncio.sleep(self.step_delay_s)

    def _take_batch(self, batch_id: int) -> list[int]:
        if batch_id not in self.batches:
            raise ContractError(f"no cached batch {batch_id}; have {sorted(self.batches)}")
        return self.batches.pop(batch_id)

    def _running(self, batches, extensions) -> list[int]:
        running: list[int] = []
        for batch in batches:
            members = self._take_batch(batch.id)
            if list(batch.request_ids) != members:
                raise ContractError(f"batch {batch.id} holds {members}, router says "
                                    f"{list(batch.request_ids)}")
            running.extend(members)
        for extension in extensions:
            if extension.request_id not in running:
                raise ContractError(f"extension for {extension.request_id}, not running")
            self._check_blocks(extension.blocks)
            self.requests[extension.request_id].blocks.extend(extension.blocks)
        return running

    def _new_batch(self, running: list[int], generations) -> generate_pb2.CachedBatch | None:
        finished = {g.request_id for g in generations if g.finish_reason}
        keep = [request_id for request_id in running if request_id not in finished]
        for request_id in finished:
            self.requests.pop(request_id, None)
        if not keep:
            return None
        batch_id = next(self._batch_ids)
        self.batches[batch_id] = keep
        return generate_pb2.CachedBatch(id=batch_id, request_ids=keep)

    # ------------------------------------------------------------------ the "model"

    def _prefill_one(self, request: generate_pb2.Request) -> generate_pb2.Generation:
        ids = list(request.input_ids)
        if any(token >= VOCAB for token in ids):
            raise ContractError(f"request {request.id}: token id >= vocab size {VOCAB}")
        if not request.cache_len < len(ids):
            raise ContractError(f"request {request.id}: cache_len {request.cache_len} "
                                f">= {len(ids)} input ids")
        if len(request.slots) != len(ids) - request.cache_len:
            raise ContractError(f"request {request.id}: {len(request.slots)} slots for "
                                f"{len(ids) - request.cache_len} positions")
        blocks = list(request.blocks)
        self._check_blocks(blocks)
        for offset, slot in enumerate(request.slots):
            expected = self._slot(blocks, request.cache_len + offset, request.id)
            if slot != expected:
                raise ContractError(f"request {request.id}: slot {slot} for position "
                                    f"{request.cache_len + offset}, blocks say {expected}")
        length = request.chunk_len or len(ids) - request.cache_len
        end = request.cache_len + length
        if end > len(ids):
            raise ContractError(f"request {request.id}: chunk past the end of input_ids")
        self.stats.chunks.append((request.id, request.cache_len, length))
        self.stats.generated_offsets.append(request.generated_offset)
        for position in range(request.cache_len, end):
            self.kv[request.slots[position - request.cache_len]] = (ids[position], position)
        generation = generate_pb2.Generation(request_id=request.id)
        if request.prefill_logprobs:
            generation.prefill_tokens.ids.extend(ids[request.cache_len:end])
            generation.prefill_tokens.logprobs.extend(
                [-float(p) for p in range(request.cache_len, end)])
        if end < len(ids):
            return generation
        state = _RequestState(request.parameters, request.stopping_parameters,
                              request.top_n_tokens, blocks,
                              position=len(ids), last_token=0,
                              generated=request.generated_offset,
                              remaining=request.stopping_parameters.max_new_tokens)
        self.requests[request.id] = state
        return self._sample(request.id, state, self._read(blocks, len(ids), request.id),
                            generation)

    def _decode_one(self, request_id: int) -> generate_pb2.Generation:
        state = self.requests[request_id]
        self.kv[self._slot(state.blocks, state.position, request_id)] = (state.last_token,
                                                                         state.position)
        state.position += 1
        context = self._read(state.blocks, state.position, request_id)
        return self._sample(request_id, state, context,
                            generate_pb2.Generation(request_id=request_id))

    def _sample(self, request_id: int, state: _RequestState, context: list[int],
                generation: generate_pb2.Generation) -> generate_pb2.Generation:
        token = next_token(context, state.parameters, state.generated)
        state.last_token = token
        state.generated += 1
        state.remaining -= 1
        generation.tokens.ids.append(token)
        generation.tokens.logprobs.append(-0.5)
        if state.top_n_tokens:
            alternatives = [(token + k) % VOCAB for k in range(state.top_n_tokens)]
            generation.top_tokens.add(ids=alternatives,
                                      logprobs=[-0.5 - k for k in range(state.top_n_tokens)])
        if token == EOS and not state.stopping.ignore_eos_token:
            generation.finish_reason = generate_pb2.FINISH_REASON_EOS_TOKEN
        elif state.remaining == 0:
            generation.finish_reason = generate_pb2.FINISH_REASON_LENGTH
        return generation

    def _read(self, blocks: list[int], length: int, request_id: int) -> list[int]:
        context = []
        for position in range(length):
            token, stored = self.kv.get(self._slot(blocks, position, request_id), (-1, -1))
            if stored != position:
                raise ContractError(f"request {request_id}: KV of position {position} holds "
                                    f"position {stored}")
            context.append(token)
        return context

    def _slot(self, blocks: list[int], position: int, request_id: int) -> int:
        index = position // self.block_size
        if index >= len(blocks):
            raise ContractError(f"request {request_id}: no block for position {position} "
                                f"({len(blocks)} blocks)")
        return blocks[index] * self.block_size + position % self.block_size

    def _check_blocks(self, blocks) -> None:
        bad = [block for block in blocks if not 0 < block < self.num_blocks]
        if bad:
            raise ContractError(f"blocks {bad} outside 1..{self.num_blocks - 1}")


class FakeShards:
    """Fake shards served on `{uds_path}-{rank}`, as the launcher lays out the real ones."""

    def __init__(self, uds_path: str, shards: list[FakeShard]) -> None:
        self.uds_path = uds_path
        self.shards = shards
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        for rank, shard in enumerate(self.shards):
            server = grpc.aio.server()
            generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
            server.add_insecure_port(f"unix://{self.uds_path}-{rank}")
            await server.start()
            self.servers.append(server)

    async def stop_rank(self, rank: int) -> None:
        await self.servers[rank].stop(grace=None)

    async def stop(self) -> None:
        await asyncio.gather(*(server.stop(grace=None) for server in self.servers))


def uds_path(tmp_path: Path) -> str:
    """A socket path prefix in tmp_path, or in a short temporary folder when tmp_path is
    too long for a unix socket address (about 100 bytes)."""
    if len(str(tmp_path)) < 80:
        return str(tmp_path / "shard")
    return tempfile.mkdtemp(prefix="sg-") + "/shard"


# ---------------------------------------------------------------------- tests of the fake


def _prefill_request(shard: FakeShard, request_id: int, prompt: list[int], blocks: list[int],
                     *, cache_len: int = 0, slots: list[int] | None = None,
                     max_new_tokens: int = 3) -> generate_pb2.PrefillRequest:
    if slots is None:
        slots = [shard._slot(blocks, p, request_id) for p in range(cache_len, len(prompt))]
    request = generate_pb2.Request(
        id=request_id, input_ids=prompt, blocks=blocks, slots=slots, cache_len=cache_len,
        stopping_parameters=generate_pb2.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens, ignore_eos_token=True))
    return generate_pb2.PrefillRequest(batch=generate_pb2.Batch(id=1, requests=[request]))


class _AbortContext:
    async def abort(self, code, details):
        raise ContractError(details)


def _serve(shard: FakeShard, request) -> generate_pb2.PrefillResponse:
    return asyncio.run(shard.Prefill(request, _AbortContext()))


def test_fake_shard_follows_the_reference_through_prefill_and_decodes():
    shard = FakeShard(num_blocks=8)
    prompt = [5, 6, 7, 8, 9]
    response = _serve(shard, _prefill_request(shard, 1, prompt, [3, 5], max_new_tokens=4))
    tokens = list(response.generations[0].tokens.ids)
    batch = response.batch
    extension = [generate_pb2.BlockTableExtension(request_id=1, blocks=[6])]
    for _ in range(3):
        decode = asyncio.run(shard.Decode(generate_pb2.DecodeRequest(
            batches=[batch], block_extensions=extension), _AbortContext()))
        extension = []
        tokens.extend(decode.generations[0].tokens.ids)
        batch = decode.batch
    assert tokens == reference_tokens(prompt, 4, ignore_eos=True)
    assert decode.generations[0].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_fake_shard_rejects_slots_that_disagree_with_the_blocks():
    shard = FakeShard(num_blocks=8)
    request = _prefill_request(shard, 1, [5, 6, 7], [3], slots=[12, 13, 15])
    with pytest.raises(ContractError, match="slot 15 for position 2"):
        _serve(shard, request)


def test_fake_shard_reads_a_cached_prefix_from_where_the_blocks_say():
    shard = FakeShard(num_blocks=8)
    first = [5, 6, 7, 8, 9, 10]
    _serve(shard, _prefill_request(shard, 1, first, [3, 5]))
    # A prefix that was never written there: the fake notices, as a real model would
    # silently produce other tokens.
    with pytest.raises(ContractError, match="KV of position 0"):
        _serve(shard, _prefill_request(shard, 2, [5, 6, 7, 8, 1], [4, 6], cache_len=4))
    reused = _serve(shard, _prefill_request(shard, 3, [5, 6, 7, 8, 1], [3, 6], cache_len=4))
    assert list(reused.generations[0].tokens.ids) == reference_tokens(
        [5, 6, 7, 8, 1], 1, ignore_eos=True)


def test_fake_shard_samples_from_seed_and_draw_index():
    assert reference_tokens([4, 4], 3, seed=1, do_sample=True) != reference_tokens(
        [4, 4], 3, seed=2, do_sample=True)
    full = reference_tokens([4, 4], 5, seed=9, do_sample=True, ignore_eos=True)
    shard = FakeShard(num_blocks=8)
    prompt = [4, 4] + full[:2]
    request = _prefill_request(shard, 1, prompt, [1])
    request.batch.requests[0].parameters.do_sample = True
    request.batch.requests[0].parameters.seed = 9
    request.batch.requests[0].generated_offset = 2
    response = _serve(shard, request)
    assert list(response.generations[0].tokens.ids) == full[2:3]
