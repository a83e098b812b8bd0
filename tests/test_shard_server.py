"""The shard through real gRPC on a unix socket, on the real stories260K weights.

Greedy tokens and prompt log-probabilities are compared with transformers on the same
checkpoint; chunked prefill, prefix reuse, joining a running batch, FilterBatch and
errors go through the same server.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from shard_rpc import BLOCK_SIZE, InProcessShard, MiniRouter, Reference, greedy, running_shard
from shardgen.proto import generate_pb2
from shardgen.shard import outputs

NUM_BLOCKS = 64
PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They saw a big dog", "The cat"]


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def shard() -> Iterator[InProcessShard]:
    with running_shard("--num-blocks", str(NUM_BLOCKS)) as served:
        yield served


@pytest.fixture()
def router(shard: InProcessShard) -> MiniRouter:
    shard.stub.ClearCache(generate_pb2.ClearCacheRequest())
    response = shard.stub.Warmup(generate_pb2.WarmupRequest(
        max_batch_prefill_tokens=64, max_batch_size=4, max_total_tokens=128))
    assert (response.num_blocks, response.block_size) == (NUM_BLOCKS, BLOCK_SIZE)
    return MiniRouter(shard.stub, response.num_blocks)


def test_steps_fail_cleanly_before_warmup() -> None:
    with running_shard("--num-blocks", "8") as cold:
        router = MiniRouter(cold.stub, 8)
        with pytest.raises(grpc.RpcError) as raised:
            router.prefill(1, [router.request(1, [1, 2, 3])])
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "Warmup" in raised.value.details()
        cold.stub.Health(generate_pb2.HealthRequest(deep=True))  # a deep probe needs no warm-up


def test_info_and_discovery_describe_the_shard(shard: InProcessShard) -> None:
    info = shard.stub.Info(generate_pb2.InfoRequest())
    assert (info.architecture, info.dtype, info.device_type) == ("LlamaForCausalLM", "float32", "cpu")
    assert info.device_memory_bytes == 0  # a CPU's memory sizes no batch default
    assert (info.block_size, info.world_size, info.rank) == (BLOCK_SIZE, 1, 0)
    assert (info.vocab_size, info.max_position_embeddings) == (512, 512)
    assert sorted(info.eos_token_ids) == [1, 2]  # config.json's 2 and generation_config's 1
    assert info.model_id == shard.config.model_id and info.version
    urls = shard.stub.ServiceDiscovery(generate_pb2.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.config.uds_path}-0"]
    shard.stub.Health(generate_pb2.HealthRequest(deep=True))


def test_batched_greedy_decoding_matches_transformers(router: MiniRouter,
                                                      reference: Reference) -> None:
    prompts = [reference.encode(text) for text in PROMPTS]
    router.prefill(1, [router.request(i, p, max_new_tokens=30) for i, p in enumerate(prompts[:2])])
    for _ in range(5):
        router.decode()
    # The third request joins the running batch in a Prefill that also decodes the others.
    generations = router.prefill(2, [router.request(2, prompts[2], max_new_tokens=12)])
    assert {g.request_id for g in generations} == {0, 1, 2}
    router.run_to_completion()
    for i, prompt in enumerate(prompts):
        seq = router.sequences[i]
        expected = reference.greedy(prompt, 30 if i < 2 else 12)
        assert seq.generated == expected, f"request {i}"
        hit_eos = expected[-1] in (1, 2)
        assert seq.finish_reason == (generate_pb2.FINISH_REASON_EOS_TOKEN if hit_eos
                                     else generate_pb2.FINISH_REASON_LENGTH)


def test_chunked_prefill_and_a_reused_prefix_give_the_same_tokens(router: MiniRouter,
                                                                  reference: Reference) -> None:
    prompt = reference.encode(" ".join(PROMPTS) + " Lily was happy. She wanted to play with her "
                              "friends in the big garden.")
    assert len(prompt) > 2 * BLOCK_SIZE
    expected = reference.greedy(prompt, 8)
    # Chunks of 13 tokens: each but the last samples nothing and joins no batch.
    for start in range(0, len(prompt) - 13, 13):
        generations = router.prefill(10 + start, [router.request(
            100, prompt, max_new_tokens=8, cache_len=start, chunk_len=13)])
        assert [g.request_id for g in generations] == [100] and not generations[0].tokens.ids
        assert router.batch is None
    router.prefill(99, [router.request(100, prompt, max_new_tokens=8, cache_len=start + 13)])
    router.run_to_completion()
    assert router.sequences[100].generated == expected
    # A second request reuses the first two blocks of the first one as its cached prefix.
    shared = router.sequences[100].blocks[:2]
    router.prefill(200, [router.request(101, prompt, max_new_tokens=8, cache_len=2 * BLOCK_SIZE,
                                        blocks=shared)])
    router.run_to_completion()
    assert router.sequences[101].generated == expected


def test_prompt_logprobs_and_alternatives_match_transformers(router: MiniRouter,
                                                             reference: Reference) -> None:
    prompt = reference.encode(PROMPTS[1])
    generations = router.prefill(1, [router.request(5, prompt, max_new_tokens=2,
                                                    prefill_logprobs=True, top_n_tokens=3)])
    prefill = generations[0].prefill_tokens
    assert list(prefill.ids) == prompt
    assert prefill.logprobs[0] != prefill.logprobs[0]  # NaN: nothing predicts the first token
    assert list(prefill.logprobs[1:]) == pytest.approx(reference.prompt_logprobs(prompt), abs=1e-4)
    top = generations[0].top_tokens[0]
    assert len(top.ids) == 3 and top.ids[0] == generations[0].tokens.ids[0]
    assert top.logprobs[0] == pytest.approx(generations[0].tokens.logprobs[0])
    assert list(top.logprobs) == sorted(top.logprobs, reverse=True)


def test_prompt_logprobs_of_chunks_cover_every_position_once(
        router: MiniRouter, reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "_LOGPROB_ROWS", 4)  # several logits passes per chunk
    prompt = reference.encode(" ".join(PROMPTS))
    ids: list[int] = []
    logprobs: list[float] = []
    for start in range(0, len(prompt), 10):
        chunk_len = 0 if start + 10 >= len(prompt) else 10
        generations = router.prefill(start + 1, [router.request(
            8, prompt, max_new_tokens=1, cache_len=start, chunk_len=chunk_len,
            prefill_logprobs=True)])
        ids += generations[0].prefill_tokens.ids
        logprobs += generations[0].prefill_tokens.logprobs
    assert ids == prompt
    assert logprobs[1:] == pytest.approx(reference.prompt_logprobs(prompt), abs=1e-4)


def test_seeded_sampling_does_not_depend_on_the_batch(router: MiniRouter,
                                                      reference: Reference) -> None:
    sampled = greedy(do_sample=True, seed=1234, temperature=0.9, top_k=40, repetition_penalty=1.2)
    prompt = reference.encode(PROMPTS[0])
    router.prefill(1, [router.request(1, prompt, parameters=sampled, max_new_tokens=12)])
    router.run_to_completion()
    alone = router.sequences[1].generated
    router.prefill(2, [router.request(3, reference.encode(PROMPTS[1]), max_new_tokens=12),
                       router.request(2, prompt, parameters=sampled, max_new_tokens=12)])
    router.run_to_completion()
    assert router.sequences[2].generated == alone
    assert alone != reference.greedy(prompt, 12)  # it did sample


def test_filter_batch_drops_requests(router: MiniRouter, reference: Reference) -> None:
    prompts = [reference.encode(text) for text in PROMPTS]
    router.prefill(1, [router.request(i, p, max_new_tokens=30) for i, p in enumerate(prompts)])
    old = router.batch
    assert old is not None and list(old.request_ids) == [0, 1, 2]
    kept = router.stub.FilterBatch(generate_pb2.FilterBatchRequest(batch_id=old.id,
                                                                   request_ids=[2, 0])).batch
    assert (kept.id, list(kept.request_ids)) == (old.id, [2, 0])
    with pytest.raises(grpc.RpcError) as raised:  # the shard no longer has request 1
        router.stub.Decode(generate_pb2.DecodeRequest(batches=[old]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    router.batch = kept
    assert [g.request_id for g in router.decode()] == [2, 0]
    router.run_to_completion()
    assert router.sequences[0].generated == reference.greedy(prompts[0], 30)
    assert router.sequences[2].generated == reference.greedy(prompts[2], 30)


def test_a_failing_step_is_a_grpc_error_and_the_server_keeps_serving(
        shard: InProcessShard, router: MiniRouter, reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = reference.encode(PROMPTS[0])
    router.prefill(1, [router.request(1, prompt, max_new_tokens=10)])
    running = router.batch

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(shard.runner, "model", broken)
    with pytest.raises(grpc.RpcError) as raised:
        router.stub.Decode(generate_pb2.DecodeRequest(batches=[running]))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "injected forward failure" in raised.value.details()
    monkeypatch.undo()
    # The failed step changed nothing: the batch decodes on as if it never happened.
    router.run_to_completion()
    assert router.sequences[1].generated == reference.greedy(prompt, 10)


@pytest.mark.parametrize("change, code, message", [
    (dict(input_ids=[1, 600]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary of 512"),
    (dict(cache_len=2), grpc.StatusCode.INVALID_ARGUMENT, "cache_len 2 must be less than"),
    (dict(slots=[16]), grpc.StatusCode.INVALID_ARGUMENT, "1 slots for 2 positions"),
    (dict(blocks=[NUM_BLOCKS]), grpc.StatusCode.INVALID_ARGUMENT, f"in [1, {NUM_BLOCKS})"),
    (dict(parameters=greedy(repetition_penalty=0.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "repetition_penalty must be > 0"),
])
def test_bad_requests_are_rejected_with_the_value(router: MiniRouter, change: dict[str, object],
                                                  code: grpc.StatusCode, message: str) -> None:
    request = router.request(1, [1, 2])
    for name, value in change.items():
        request.ClearField(name)
        if isinstance(value, list):
            getattr(request, name).extend(value)
        elif isinstance(value, generate_pb2.NextTokenChooserParameters):
            request.parameters.CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as raised:
        router.prefill(1, [request])
    assert raised.value.code() == code
    assert message in raised.value.details()


def test_unknown_and_cleared_batches_are_not_found(router: MiniRouter) -> None:
    router.prefill(7, [router.request(1, [1, 2, 3])])
    assert router.batch is not None
    router.stub.ClearCache(generate_pb2.ClearCacheRequest(id=router.batch.id))
    with pytest.raises(grpc.RpcError) as raised:
        router.decode()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "batch 7 is not cached" in raised.value.details()
