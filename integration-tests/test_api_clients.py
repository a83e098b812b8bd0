"""The official clients against the real stack: `openai` and `huggingface_hub.InferenceClient`.

One server (launcher → shard → router, with --api-key) serves a tiny random Qwen2 that
carries the Qwen2 tokenizer and its chat template. Greedy answers must equal transformers'
own greedy generation on the same weights and the same templated prompt; streamed answers
must add up to the non-streamed ones; a seeded sampled request must give the same text
alone and inside a batch of other requests; DELETE /v1/requests/{id} must stop a running
request and give its KV blocks back.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from harness import SHARED, Server

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")
huggingface_hub = pytest.importorskip("huggingface_hub")

QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"
API_KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Tell me a story about a dog."}]
PROMPT = "Once upon a time"
MAX_TOKENS = 8


def build_model(folder: Path) -> Path:
    """A 2-layer Qwen2 with hidden size 32 over the Qwen2 vocabulary (about 20 MB)."""
    tokenizer = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         # Wide weights spread the logits: greedy steps have clear winners.
                         initializer_range=0.2)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN2_TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip(f"fixture tokenizer missing: {QWEN2_TOKENIZER}")
    return build_model(tmp_path_factory.mktemp("qwen2-chat"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "launcher.log"
    # Warm-up measures a prefill of --max-batch-prefill-tokens and sampling over
    # --max-batch-size rows of a 151k vocabulary: small values keep the boot to seconds.
    server = Server("--model-id", str(model_dir), "--api-key", API_KEY,
                    "--max-batch-size", "16", "--max-batch-prefill-tokens", "1024",
                    "--kv-cache-bytes", str(32 * 2**20), log_path=log)
    yield server
    server.stop()


@lru_cache(maxsize=None)
def _reference(model_dir: Path) -> tuple[Qwen2ForCausalLM, object]:
    return (Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            AutoTokenizer.from_pretrained(model_dir))


def greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int = MAX_TOKENS) -> str:
    """transformers' greedy continuation of prompt_ids, decoded."""
    model, tokenizer = _reference(model_dir)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def chat_prompt_ids(model_dir: Path) -> list[int]:
    tokenizer = _reference(model_dir)[1]
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def hub_client(server: Server) -> huggingface_hub.InferenceClient:
    return huggingface_hub.InferenceClient(base_url=server.url, api_key=API_KEY, timeout=120)


# ---------------------------------------------------------------- openai


def test_openai_chat_equals_transformers_streamed_or_not(server: Server, model_dir: Path
                                                         ) -> None:
    client = openai_client(server)
    answer = client.chat.completions.create(model="qwen2", messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, temperature=0)
    expected = greedy(model_dir, chat_prompt_ids(model_dir))
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(chat_prompt_ids(model_dir))
    assert answer.usage.completion_tokens == MAX_TOKENS
    chunks = list(client.chat.completions.create(
        model="qwen2", messages=MESSAGES, max_completion_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and not chunks[-1].choices


def test_openai_chat_logprobs_and_seeded_choices(server: Server) -> None:
    client = openai_client(server)
    request = dict(model="qwen2", messages=MESSAGES, max_tokens=6, n=2, seed=7,
                   temperature=1.0, logprobs=True, top_logprobs=2)
    first = client.chat.completions.create(**request)
    again = client.chat.completions.create(**request)
    texts = [choice.message.content for choice in first.choices]
    assert texts == [choice.message.content for choice in again.choices]
    assert texts[0] != texts[1]  # choice i draws with seed + i
    for choice in first.choices:
        content = choice.logprobs.content
        assert len(content) == 6 and all(len(entry.top_logprobs) == 2 for entry in content)
        assert "".join(entry.token for entry in content) == choice.message.content


def test_openai_completions_equal_transformers_streamed_or_not(server: Server,
                                                               model_dir: Path) -> None:
    client = openai_client(server)
    tokenizer = _reference(model_dir)[1]
    prompts = [PROMPT, "The little dog"]
    answer = client.completions.create(model="qwen2", prompt=prompts, max_tokens=MAX_TOKENS,
                                       temperature=0)
    expected = [greedy(model_dir, tokenizer(p)["input_ids"]) for p in prompts]
    assert [choice.text for choice in answer.choices] == expected
    stream = client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True, echo=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == PROMPT + expected[0]


def test_openai_errors_arrive_as_api_errors(server: Server) -> None:
    client = openai_client(server)
    with pytest.raises(openai.UnprocessableEntityError, match="structured output"):
        client.chat.completions.create(model="qwen2", messages=MESSAGES,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).models.list()
    assert [model.id for model in client.models.list()] == [str(server_model(server))]


def server_model(server: Server) -> str:
    return requests.get(f"{server.url}/info", timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()["model_id"]


# ---------------------------------------------------------------- huggingface_hub


def test_hub_text_generation_with_and_without_stream_and_details(server: Server,
                                                                 model_dir: Path) -> None:
    client = hub_client(server)
    tokenizer = _reference(model_dir)[1]
    expected = greedy(model_dir, tokenizer(PROMPT)["input_ids"])
    assert client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS) == expected
    detailed = client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True)
    assert detailed.generated_text == expected
    assert detailed.details.generated_tokens == MAX_TOKENS
    assert detailed.details.finish_reason == "length"
    assert "".join(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS,
                                          stream=True)) == expected
    events = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True,
                                         details=True))
    assert [event.token.id for event in events] == [t.id for t in detailed.details.tokens]
    assert events[-1].generated_text == expected


def test_hub_chat_completion_streamed_or_not(server: Server, model_dir: Path) -> None:
    client = hub_client(server)
    expected = greedy(model_dir, chat_prompt_ids(model_dir))
    answer = client.chat_completion(MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == expected
    chunks = client.chat_completion(MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                    stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# ---------------------------------------------------------------- reproducibility, cancel


def _generate(server: Server, inputs: str, **parameters: object) -> dict:
    response = requests.post(f"{server.url}/generate", timeout=120,
                             json={"inputs": inputs, "parameters": parameters},
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_seeded_request_is_the_same_alone_and_in_a_batch(server: Server) -> None:
    seeded = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95, seed=1234,
                  details=True)
    alone = _generate(server, PROMPT, **seeded)
    others = [(f"{PROMPT} number {i}", dict(max_new_tokens=4 + i, do_sample=i % 2 == 0,
                                            seed=i, top_k=50 if i % 3 else None))
              for i in range(7)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_generate, server, PROMPT, **seeded)]
        futures += [pool.submit(_generate, server, inputs, **{
            k: v for k, v in parameters.items() if v is not None}) for inputs, parameters in others]
        in_batch = futures[0].result()
        for future in futures[1:]:
            future.result()
    assert in_batch["generated_text"] == alone["generated_text"]
    assert [t["id"] for t in in_batch["details"]["tokens"]] == [
        t["id"] for t in alone["details"]["tokens"]]


def _kv_blocks_used(server: Server) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(r"^shardgen_kv_blocks_used (\S+)$", text, re.M).group(1))


def test_delete_stops_a_running_stream_and_frees_its_blocks(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "x-request-id": "cancel-me"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    with requests.post(f"{server.url}/generate_stream", json=body, headers=headers,
                       stream=True, timeout=120) as response:
        assert response.headers["x-request-id"] == "cancel-me"
        lines = response.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line.startswith("data:"))
        assert '"token"' in first
        assert _kv_blocks_used(server) > 0
        deleted = requests.delete(f"{server.url}/v1/requests/cancel-me", headers=headers,
                                  timeout=10)
        assert deleted.status_code == 200, deleted.text
        events = [line for line in lines if line.startswith("data:")]
    assert '"error_type":"cancelled"' in events[-1]
    assert len(events) < 399  # it did stop
    deadline = time.monotonic() + 10
    while _kv_blocks_used(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _kv_blocks_used(server) == 0
    again = requests.delete(f"{server.url}/v1/requests/cancel-me", headers=headers, timeout=10)
    assert again.status_code == 404
