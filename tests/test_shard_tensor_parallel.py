"""Two shards over gloo, as processes: the same steps on both, rank 0 answers.

Each rank holds half of the attention heads and of the vocabulary; the greedy tokens
must still be transformers' own.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from shard_rpc import MiniRouter, Reference, shard_processes, shard_stub, wait_healthy
from shardgen.proto import generate_pb2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_run_the_same_steps_and_rank_0_answers() -> None:
    reference = Reference()
    prompt = reference.encode("Once upon a time")
    with shard_processes(2, "--num-blocks", "16") as (uds, processes, logs):
        wait_healthy(uds, processes, logs)
        stubs = [shard_stub(uds, rank) for rank in range(2)]
        urls = stubs[1].ServiceDiscovery(generate_pb2.ServiceDiscoveryRequest()).urls
        assert list(urls) == [f"unix://{uds}-0", f"unix://{uds}-1"]

        with ThreadPoolExecutor(2) as pool:
            def broadcast(method: str, request: object) -> list[object]:
                return list(pool.map(lambda stub: getattr(stub, method)(request, timeout=60), stubs))

            broadcast("Warmup", generate_pb2.WarmupRequest(max_batch_prefill_tokens=32,
                                                           max_batch_size=2, max_total_tokens=64))
            router = MiniRouter(stubs[0], 16)
            request = router.request(1, prompt, max_new_tokens=12)
            answers = broadcast("Prefill", generate_pb2.PrefillRequest(
                batch=generate_pb2.Batch(id=1, requests=[request])))
            tokens = [g.tokens.ids[0] for g in answers[0].generations]
            while answers[0].HasField("batch"):
                assert not answers[1].generations and answers[1].batch == answers[0].batch
                router.batch = answers[0].batch
                router.sequences[1].generated = tokens
                answers = broadcast("Decode", generate_pb2.DecodeRequest(
                    batches=[answers[0].batch], block_extensions=router._extensions()))
                tokens += [g.tokens.ids[0] for g in answers[0].generations]
            assert not answers[1].HasField("batch")
        assert tokens == reference.greedy(prompt, 12)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=30) for p in processes] == [0, 0], logs[0].read_text()
