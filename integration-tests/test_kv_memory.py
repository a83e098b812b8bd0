"""KV memory through the real stack: prefix reuse, chunked prefill, preemption, idle gauges."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import STORIES, Server

pytestmark = pytest.mark.integration

# A long shared prefix (well over several 16-token blocks) and distinct questions.
PREFIX = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
          "the park with her friends. One day, she saw a big red ball under a tree. ")
QUESTIONS = ["She", "Lily wanted to", "Her mom said", "The ball was"]


def metrics(server: Server) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def greedy_ids(server: Server, prompt: str, max_new_tokens: int = 24) -> list[int]:
    response = requests.post(f"{server.url}/generate", timeout=300, json={
        "inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}})
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def wait_idle(server: Server, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(server)
        if values["shardgen_kv_blocks_used"] == 0 and values["shardgen_queue_size"] == 0:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {values}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uncached_server(tmp_path_factory: pytest.TempPathFactory):
    server = Server("--model-id", str(STORIES), "--disable-prefix-caching",
                    "--kv-cache-bytes", str(64 << 20),
                    log_path=tmp_path_factory.mktemp("uncached") / "log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory: pytest.TempPathFactory):
    server = Server("--model-id", str(STORIES), "--kv-cache-bytes", str(64 << 20),
                    log_path=tmp_path_factory.mktemp("cached") / "log")
    yield server
    server.stop()


def test_shared_prefix_reuses_blocks_and_gives_the_same_tokens(
        cached_server: Server, uncached_server: Server) -> None:
    expected = {q: greedy_ids(uncached_server, PREFIX + q) for q in QUESTIONS}
    assert metrics(uncached_server)["shardgen_prefix_cache_hit_tokens_total"] == 0

    before = metrics(cached_server)["shardgen_prefix_cache_hit_tokens_total"]
    first = greedy_ids(cached_server, PREFIX + QUESTIONS[0])
    after_first = metrics(cached_server)["shardgen_prefix_cache_hit_tokens_total"]
    rest = {q: greedy_ids(cached_server, PREFIX + q) for q in QUESTIONS[1:]}
    after_rest = metrics(cached_server)["shardgen_prefix_cache_hit_tokens_total"]

    assert first == expected[QUESTIONS[0]]
    assert rest == {q: expected[q] for q in QUESTIONS[1:]}
    # The prefix spans several full blocks, so each later prompt reuses at least two of them.
    assert after_rest - after_first >= len(QUESTIONS[1:]) * 2 * 16
    assert after_first >= before
    idle = wait_idle(cached_server)
    assert idle["shardgen_kv_blocks_cached"] > 0  # kept for reuse, not referenced


def test_long_prompt_is_chunked_and_gives_the_same_tokens(
        uncached_server: Server, tmp_path: Path) -> None:
    prompt = PREFIX * 3
    expected = greedy_ids(uncached_server, prompt)
    chunked = Server("--model-id", str(STORIES), "--disable-prefix-caching",
                     "--max-batch-prefill-tokens", "32", "--kv-cache-bytes", str(64 << 20),
                     log_path=tmp_path / "log")
    try:
        # Decodes of a running request keep going while the long prompt is chunked.
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = pool.submit(greedy_ids, chunked, QUESTIONS[0], 40)
            assert greedy_ids(chunked, prompt) == expected
            assert running.result() == greedy_ids(uncached_server, QUESTIONS[0], 40)
        assert metrics(chunked)["shardgen_prompt_tokens_total"] > 32
    finally:
        chunked.stop()


def test_tiny_kv_budget_preempts_and_every_request_completes(
        uncached_server: Server, tmp_path: Path) -> None:
    prompts = [f"{q} {i}" for i in range(3) for q in QUESTIONS]  # 12 requests
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        expected = dict(zip(prompts, pool.map(lambda p: greedy_ids(uncached_server, p, 48),
                                              prompts)))
    # 24 blocks of 16 tokens: about 370 tokens for 12 requests that each need about 55.
    tiny = Server("--model-id", str(STORIES), "--num-blocks", "24", "--max-total-tokens", "128",
                  "--max-input-tokens", "64",
                  log_path=tmp_path / "log")
    try:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            results = dict(zip(prompts, pool.map(lambda p: greedy_ids(tiny, p, 48), prompts)))
        assert results == expected
        idle = wait_idle(tiny)
        assert idle["shardgen_preemptions_total"] > 0
        assert idle["shardgen_kv_blocks_used"] == 0
        assert idle["shardgen_batch_current_size"] == 0
    finally:
        tiny.stop()


def test_too_small_kv_cache_fails_at_start_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as failure:
        Server("--model-id", str(STORIES), "--num-blocks", "24", log_path=tmp_path / "log")
    message = str(failure.value)
    assert "launcher exited with 1" in message
    assert "--max-total-tokens" in message


def test_kv_events_stream_the_stored_blocks(cached_server: Server) -> None:
    """A load balancer subscribed to /v1/kv_events sees the prompt's blocks stored, under
    hashes it can compute itself from the token ids."""
    import json
    import threading

    from transformers import AutoTokenizer

    from shardgen.router.radix import block_hash

    prompt = "A brand new story about a purple cat and a tiny green frog who lived by the sea."
    events: list[dict] = []
    connected = threading.Event()

    def subscribe() -> None:
        with requests.get(f"{cached_server.url}/v1/kv_events", stream=True, timeout=60) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            connected.set()
            for line in resp.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if events[-1]["kind"] == "stored":
                        return

    reader = threading.Thread(target=subscribe, daemon=True)
    reader.start()
    assert connected.wait(30)
    greedy_ids(cached_server, prompt, 4)
    reader.join(30)
    stored = [e for e in events if e["kind"] == "stored"]
    assert stored, events
    ids = AutoTokenizer.from_pretrained(STORIES)(prompt)["input_ids"]
    first = block_hash(None, ids[:16])
    assert stored[0]["block_hashes"][0] == first
    assert stored[0]["parent_hash"] is None
    assert stored[0]["token_count"] == 16 * len(stored[0]["block_hashes"])


def test_cache_priority_is_accepted_and_bounded(cached_server: Server) -> None:
    ok = requests.post(f"{cached_server.url}/generate", timeout=60, json={
        "inputs": PREFIX + "The end.", "parameters": {"max_new_tokens": 2, "cache_priority": 50,
                                                      "cache_priority_tokens": 32}})
    assert ok.status_code == 200, ok.text
    bad = requests.post(f"{cached_server.url}/generate", timeout=60, json={
        "inputs": "Hi", "parameters": {"cache_priority": 1000}})
    assert bad.status_code == 422
    assert "cache_priority" in bad.json()["error"]
