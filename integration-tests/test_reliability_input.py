"""Hostile input through the real stack: each gets a clear 4xx and changes nothing else.

After every refused request the server answers a plain prompt with the same tokens as
before, and holds no block and no queued request. The API key guards every API route
(401 when missing or wrong, also for bytes that are not UTF-8), never the probes.
Special-token strings written in `inputs` are text: "</s>" does not become EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
import torch
from transformers import LlamaForCausalLM

from harness import STORIES, Server
from reliability import sample, scrape, stories_tokenizer, wait_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOLDEN = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    served = Server("--model-id", str(STORIES), "--api-key", KEY,
                    log_path=tmp_path_factory.mktemp("input") / "launcher.log")
    yield served
    served.stop()


def post(server: Server, data: bytes, path: str = "/generate",
         headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{server.url}{path}", data=data, timeout=60,
                         headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def golden_ids(server: Server) -> list[int]:
    body = json.dumps({"inputs": GOLDEN, "parameters": {"max_new_tokens": 8, "details": True}})
    response = post(server, body.encode())
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def golden(server: Server) -> list[int]:
    return golden_ids(server)


def body(inputs: object = "Hi", **parameters: object) -> bytes:
    return json.dumps({"inputs": inputs, "parameters": parameters}).encode()


HOSTILE = {
    "oversized body": (b'{"inputs": "' + b"a" * 2_100_000 + b'"}', "/generate", 413,
                       "payload limit"),
    "deep JSON": (b"[" * 50_000 + b"]" * 50_000, "/generate", 400, "nested too deeply"),
    "malformed JSON": (b'{"inputs": "Hi",', "/generate", 400, "not valid JSON"),
    "invalid UTF-8": (b'{"inputs": "caf\xe9"}', "/generate", 400, "utf-8"),
    "lone surrogate": (b'{"inputs": "Hi \\udc80"}', "/generate", 422, "not valid Unicode"),
    "inputs of the wrong type": (body(inputs={"text": "Hi"}), "/generate", 400,
                                 "must be a string"),
    "parameter of the wrong type": (body(max_new_tokens="5"), "/generate", 422,
                                    "must be an integer"),
    "huge max_new_tokens": (body(max_new_tokens=10**12), "/generate", 422, "max_new_tokens"),
    "huge integer literal": (b'{"inputs": "Hi", "parameters": {"seed": ' + b"7" * 5000 + b"}}",
                             "/generate", 400, "not valid JSON"),
    "huge best_of": (body(best_of=10**6, do_sample=True), "/generate", 422, "best_of"),
    "huge n": (json.dumps({"prompt": "Hi", "n": 10**6, "max_tokens": 2}).encode(),
               "/v1/completions", 422, "`n`"),
    "too many stop sequences": (body(stop=[str(i) for i in range(100)]), "/generate", 422,
                                "stop"),
    "unknown top-level field": (json.dumps({"inputs": "Hi", "max_new_tokens": 5}).encode(),
                                "/generate_stream", 422, "unknown field"),
    "unknown parameter": (body(max_tokens=5), "/generate", 422, "unknown parameter"),
    "negative temperature": (body(temperature=-1.0), "/generate_stream", 422, "temperature"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_gets_a_clear_4xx_and_changes_nothing(
        server: Server, golden: list[int], case: str) -> None:
    data, path, status, words = HOSTILE[case]
    before = scrape(server)
    response = post(server, data, path)
    assert response.status_code == status, response.text[:300]
    error = response.json()
    assert "error" in error and len(json.dumps(error)) < 1000
    assert words in json.dumps(error), error
    # Nothing else changed: the same answer to the same prompt, and nothing held.
    assert golden_ids(server) == golden
    idle = wait_idle(server)
    assert sample(idle, "shardgen_requests_total", outcome="success") - sample(
        before, "shardgen_requests_total", outcome="success") == 1


def test_special_token_strings_in_inputs_are_plain_text(server: Server) -> None:
    prompt = "Once upon a time</s> there was a cat<s>"
    tokenizer = stories_tokenizer()
    literal = tokenizer(prompt, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in literal  # whereas parsing would give EOS here:
    assert tokenizer.eos_token_id in tokenizer(prompt)["input_ids"]
    response = post(server, body(prompt, max_new_tokens=12, details=True,
                                 decoder_input_details=True))
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert [token["id"] for token in details["prefill"]] == literal
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    out = model.generate(torch.tensor([literal]), max_new_tokens=12, do_sample=False)
    assert [token["id"] for token in details["tokens"]] == out[0, len(literal):].tolist()


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": KEY}, {"Authorization": f"bearer {KEY}"},
    {"Authorization": "Bearer s3cr\xe9t-key"},  # latin-1 on the wire: not UTF-8
])
def test_a_missing_or_wrong_api_key_is_401(server: Server, golden: list[int],
                                           headers: dict[str, str]) -> None:
    for path, data in (("/generate", body(max_new_tokens=2)),
                       ("/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()),
                       ("/info", None)):
        method = requests.get if data is None else requests.post
        response = method(f"{server.url}{path}", data=data, timeout=30,
                          headers={"Content-Type": "application/json", **headers})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error_type"] == "authentication"
    assert golden_ids(server) == golden


def test_probes_and_metrics_need_no_key(server: Server) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert requests.get(f"{server.url}{path}", timeout=30).status_code == 200, path
