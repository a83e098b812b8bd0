"""End to end on stories260K: launcher → shard → router over real gRPC and HTTP.

Greedy generation must equal transformers' own greedy generation on the same weights,
token for token.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pytest
import requests
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from harness import STORIES, Server

pytestmark = pytest.mark.integration

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park. They",
    "One day, a big bird",
]
MAX_NEW_TOKENS = 24


@lru_cache(maxsize=None)
def reference_tokens(prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation (stops on the model's EOS ids, as the server does)."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


def generate(server: Server, inputs: str, **parameters: object) -> requests.Response:
    return requests.post(f"{server.url}/generate",
                         json={"inputs": inputs, "parameters": parameters}, timeout=120)


def stream_events(server: Server, inputs: str, **parameters: object) -> list[dict]:
    events = []
    with requests.post(f"{server.url}/generate_stream",
                       json={"inputs": inputs, "parameters": parameters},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                events.append(json.loads(line[len("data:"):]))
    return events


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generate_matches_transformers(stories_server: Server, prompt: str) -> None:
    response = generate(stories_server, prompt, max_new_tokens=MAX_NEW_TOKENS, details=True)
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [token["id"] for token in body["details"]["tokens"]]
    expected = reference_tokens(prompt)
    assert ids == expected
    assert body["details"]["generated_tokens"] == len(expected)
    expected_reason = "length" if len(expected) == MAX_NEW_TOKENS else "eos_token"
    assert body["details"]["finish_reason"] == expected_reason
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    assert body["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert all(token["logprob"] <= 0.0 for token in body["details"]["tokens"])


def test_known_continuation_of_the_golden_model(stories_server: Server) -> None:
    body = generate(stories_server, "Once upon a time", max_new_tokens=12).json()
    assert body["generated_text"].startswith(", there was a little girl named Lily.")


def test_stream_yields_the_same_tokens(stories_server: Server) -> None:
    prompt = PROMPTS[2]
    events = stream_events(stories_server, prompt, max_new_tokens=MAX_NEW_TOKENS)
    ids = [event["token"]["id"] for event in events]
    assert ids == reference_tokens(prompt)
    assert all(event["generated_text"] is None for event in events[:-1])
    last = events[-1]
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    assert last["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert last["details"]["generated_tokens"] == len(ids)
    streamed_text = "".join(event["token"]["text"] for event in events
                            if not event["token"]["special"])
    assert streamed_text == last["generated_text"]


def test_sixteen_concurrent_requests_complete_and_agree(stories_server: Server) -> None:
    prompts = [PROMPTS[i % 2] for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(
            lambda p: generate(stories_server, p, max_new_tokens=MAX_NEW_TOKENS, details=True),
            prompts))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    by_prompt: dict[str, set[str]] = {}
    for prompt, response in zip(prompts, responses):
        by_prompt.setdefault(prompt, set()).add(response.json()["generated_text"])
        ids = [t["id"] for t in response.json()["details"]["tokens"]]
        assert ids == reference_tokens(prompt)
    assert all(len(texts) == 1 for texts in by_prompt.values())


def test_stop_sequence_ends_the_text(stories_server: Server) -> None:
    full = generate(stories_server, "Once upon a time", max_new_tokens=20).json()["generated_text"]
    assert "little" in full
    body = generate(stories_server, "Once upon a time", max_new_tokens=20, stop=["little"],
                    details=True).json()
    assert body["generated_text"] == full[:full.index("little") + len("little")]
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_seeded_sampling_is_reproducible(stories_server: Server) -> None:
    params = dict(max_new_tokens=16, do_sample=True, temperature=0.9, seed=1234, details=True)
    first = generate(stories_server, "The little dog", **params).json()
    second = generate(stories_server, "The little dog", **params).json()
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 1234


@pytest.mark.parametrize("body, field", [
    ({"inputs": "", "parameters": {}}, "inputs"),
    ({"inputs": "Hi", "parameters": {"temperature": -1.0}}, "temperature"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 10**6}}, "max_new_tokens"),
    ({"inputs": "Hi", "parameters": {"top_p": 1.5}}, "top_p"),
    ({"inputs": 42}, "inputs"),
])
def test_bad_requests_get_a_4xx_json_error(stories_server: Server, body: dict, field: str) -> None:
    response = requests.post(f"{stories_server.url}/generate", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()
    assert set(error) >= {"error", "error_type"}
    assert field in error["error"]
    # ... and the server keeps serving.
    assert generate(stories_server, "Once upon a time", max_new_tokens=4).status_code == 200


def test_malformed_json_gets_400(stories_server: Server) -> None:
    response = requests.post(f"{stories_server.url}/generate", data=b"{not json",
                             headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"
    assert generate(stories_server, "Once upon a time", max_new_tokens=4).status_code == 200


def test_info_describes_the_model(stories_server: Server) -> None:
    info = requests.get(f"{stories_server.url}/info", timeout=10).json()
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] <= 512


def test_running_ahead_gives_the_same_tokens(tmp_path) -> None:
    """The shard launching each next decode before it answers (RunAhead, on by default on
    CUDA, forced here on CPU) changes no token: alone, 12 at once, and with stop sequences
    cutting requests out of the batch between steps (the step ahead is then adopted in
    part)."""
    server = Server("--model-id", str(STORIES), "--run-ahead", log_path=tmp_path / "launcher.log")
    try:
        for prompt in PROMPTS:
            body = generate(server, prompt, max_new_tokens=MAX_NEW_TOKENS, details=True).json()
            assert [t["id"] for t in body["details"]["tokens"]] == reference_tokens(prompt)
        jobs = [(PROMPTS[i % 4], ["little"] if i % 3 == 0 else []) for i in range(12)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(lambda job: generate(server, job[0], max_new_tokens=MAX_NEW_TOKENS,
                                                           stop=job[1], details=True), jobs))
        for (prompt, stop), response in zip(jobs, responses):
            assert response.status_code == 200, response.text
            ids = [t["id"] for t in response.json()["details"]["tokens"]]
            reference = reference_tokens(prompt)
            assert ids == reference[:len(ids)] and (stop or ids == reference)
    finally:
        server.stop()
