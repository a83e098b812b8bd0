"""The test-only fault injection of a real shard (shard/faults.py), through real gRPC.

A Prefill whose new request carries a marker fails with the status its fault maps to,
and changes nothing: the batch that was running decodes on to transformers' tokens, and
the shard serves the next requests. A slow marker makes every step of its request sleep
and changes no token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from shard_rpc import InProcessShard, MiniRouter, Reference, running_shard
from shardgen.proto import generate_pb2
from shardgen.shard.faults import FAULT_INJECTION_ENV, SLOW_STEP_S, Fault, FaultInjection

NUM_BLOCKS = 32
ERROR_MARKER = (300, 301, 302)
OOM_MARKER = (310, 311)
SLOW_MARKER = (320, 321)


def test_the_spec_parses_kinds_and_markers() -> None:
    injection = FaultInjection.parse(" error=1,2,3 ; oom=4 ;slow=5,6")
    assert injection.faults == (Fault("error", (1, 2, 3)), Fault("oom", (4,)),
                                Fault("slow", (5, 6)))
    assert FaultInjection.from_env({}) is None
    assert FaultInjection.from_env({FAULT_INJECTION_ENV: "oom=9"}) == FaultInjection(
        (Fault("oom", (9,)),))


@pytest.mark.parametrize("spec, words", [
    ("crash=1,2", ["unknown fault kind 'crash'", "error, oom, slow"]),
    ("error=1,x", ["'error=1,x'", "integer token ids"]),
    ("error=", ["'error='"]),
    (" ; ", ["names no fault"]),
])
def test_a_bad_spec_names_the_entry(spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        FaultInjection.parse(spec)
    for word in words:
        assert word in str(raised.value)


def test_a_marker_matches_a_contiguous_run_only() -> None:
    fault = Fault("error", (5, 6))
    assert fault.matches([1, 5, 6, 2]) and fault.matches([5, 6])
    assert not fault.matches([5, 1, 6]) and not fault.matches([6, 5]) and not fault.matches([5])


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def shard() -> Iterator[InProcessShard]:
    with running_shard("--num-blocks", str(NUM_BLOCKS)) as served:
        FaultInjection.parse(f"error={','.join(map(str, ERROR_MARKER))};"
                             f"oom={','.join(map(str, OOM_MARKER))};"
                             f"slow={','.join(map(str, SLOW_MARKER))}").install(served.runner)
        served.stub.Warmup(generate_pb2.WarmupRequest(
            max_batch_prefill_tokens=64, max_batch_size=4, max_total_tokens=128))
        yield served


@pytest.mark.parametrize("marker, code, words", [
    (ERROR_MARKER, grpc.StatusCode.INTERNAL, ["InjectedFault", "(error) for request 2"]),
    (OOM_MARKER, grpc.StatusCode.RESOURCE_EXHAUSTED, ["OutOfMemoryError", "out of memory"]),
])
def test_a_marked_request_fails_its_step_and_changes_nothing(
        shard: InProcessShard, reference: Reference, marker: tuple[int, ...],
        code: grpc.StatusCode, words: list[str]) -> None:
    shard.stub.ClearCache(generate_pb2.ClearCacheRequest())
    router = MiniRouter(shard.stub, NUM_BLOCKS)
    prompt = reference.encode("Once upon a time")
    router.prefill(1, [router.request(1, prompt, max_new_tokens=12)])
    router.decode()
    marked = [1, 50, *marker, 60]
    with pytest.raises(grpc.RpcError) as raised:
        router.prefill(2, [router.request(2, marked, max_new_tokens=4)])
    assert raised.value.code() == code
    for word in words:
        assert word in raised.value.details()
    # The running request decodes on as if the failed step had never been sent.
    router.run_to_completion()
    assert router.sequences[1].generated == reference.greedy(prompt, 12)
    # The same prompt without its marker is served.
    unmarked = [1, 50, 60]
    router.prefill(3, [router.request(3, unmarked, max_new_tokens=4)])
    router.run_to_completion()
    assert router.sequences[3].generated == reference.greedy(unmarked, 4)


def test_a_slow_request_makes_each_of_its_steps_sleep_and_changes_no_token(
        shard: InProcessShard, reference: Reference) -> None:
    shard.stub.ClearCache(generate_pb2.ClearCacheRequest())
    router = MiniRouter(shard.stub, NUM_BLOCKS)
    marked = [1, 50, *SLOW_MARKER, 60]
    started = time.monotonic()
    router.prefill(1, [router.request(1, marked, max_new_tokens=6)])
    router.run_to_completion()
    # One Prefill and five Decodes, each after a sleep.
    assert time.monotonic() - started >= 6 * SLOW_STEP_S
    assert router.sequences[1].generated == reference.greedy(marked, 6)
    unmarked = [1, 50, 60]
    router.prefill(2, [router.request(2, unmarked, max_new_tokens=6)])
    router.run_to_completion()
    assert router.sequences[2].generated == reference.greedy(unmarked, 6)
