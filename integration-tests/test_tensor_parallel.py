"""Tensor parallelism end to end: N shards over gloo serve the tokens of one shard.

Each (model, N) gets one server through the real launcher (`--num-shard N --device cpu`),
asked over HTTP: several prompts one by one (`/generate` with details), and on the
4-shard server also a few concurrent requests and one stream. The token ids of N = 2 and
4 must equal those of N = 1, which must equal transformers' own greedy generation.

The models cover the ways a split can go wrong:
  stories260K   the real tiny Llama: 8 heads, 4 KV heads (1 per rank at N = 4), tied
  llama-gqa     random Llama, 8 heads / 2 KV heads (replicated at N = 4), untied,
                vocabulary 50257 (divisible by neither 2 nor 4)
  qwen2-mqa     random Qwen2, q/k/v biases, 1 KV head (replicated at N = 2 and 4), tied
                embedding on the same uneven vocabulary
A split that cannot work (stories260K over 3 shards) must fail at start-up, naming the
numbers that do not divide.

Every server boot costs seconds on a small CPU (N processes import torch), so each
(model, N) boots once, answers everything its tests need, and stops before the next.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen2Config

from harness import SHARED, STORIES, Server, free_port
from test_generate import generate, stream_events

pytestmark = pytest.mark.integration

PROMPTS = ("Once upon a time", "The little dog", "Lily and Ben went to the park. They")
MAX_NEW_TOKENS = 12
SHARD_COUNTS = (1, 2, 4)
BUSY_SHARDS = 4  # the server that also gets concurrent and streaming requests
# Each of the N processes would otherwise size its KV cache at the CPU default.
KV_CACHE_BYTES = 64 * 2**20
# N shards each running torch's default of one thread per core oversubscribe a small CPU:
# spinning OpenMP threads starve the rank a collective waits for (a step is 4x slower at
# N = 4 on 2 cores). One thread per shard keeps the module's wall time modest.
SHARD_ENV = {"OMP_NUM_THREADS": "1"}
# Float sums over ranks differ from one process's in the last bits (~1e-6 here); a greedy
# step whose top two logits are closer than this could flip and is no fair test.
MIN_GREEDY_MARGIN = 1e-4

GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
GPT2_VOCAB = 50257  # odd: every rank but the last holds ceil(V / N) rows, the last fewer
_TINY = dict(vocab_size=GPT2_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             max_position_embeddings=128, bos_token_id=50256, eos_token_id=50256,
             # Wide weights spread the logits (std ~1.6), so greedy steps have clear winners.
             initializer_range=0.2)
RANDOM_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama-gqa": lambda: LlamaConfig(**_TINY, num_attention_heads=8, num_key_value_heads=2),
    "qwen2-mqa": lambda: Qwen2Config(**_TINY, num_attention_heads=4, num_key_value_heads=1,
                                     tie_word_embeddings=True),
}
MODELS = ("stories260K", *RANDOM_MODELS)


@dataclass(frozen=True)
class Answer:
    """What one /generate request with details returned."""

    ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        assert response.status_code == 200, response.text
        body = response.json()
        tokens = body["details"]["tokens"]
        return cls([t["id"] for t in tokens], [t["logprob"] for t in tokens],
                   body["generated_text"], body["details"]["finish_reason"])


@dataclass(frozen=True)
class Answers:
    """Everything one server was asked, collected before it stopped."""

    sequential: dict[str, Answer]                 # prompt -> its answer, one request at a time
    concurrent: list[tuple[str, Answer]] | None   # on the BUSY_SHARDS server only
    stream: list[dict] | None                     # events of PROMPTS[0], BUSY_SHARDS only
    logs: str


def save_random_model(path: Path, config: PretrainedConfig, seed: int = 0) -> Path:
    """A seeded random float32 checkpoint (safetensors) with the GPT-2 tokenizer beside it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(GPT2_TOKENIZER / name, path / name)
    return path


def transformers_greedy(model_path: Path, prompt: str) -> list[int]:
    """transformers' greedy continuation (stopping on EOS as the server does).

    Fails when a step's top two logits are too close for the comparison to be fair.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    assert min(margins) > MIN_GREEDY_MARGIN, (
        f"greedy step of {prompt!r} on {model_path.name} has a top-2 margin of {min(margins):.2e} "
        f"(need > {MIN_GREEDY_MARGIN}); pick another seed")
    return out.sequences[0, input_ids.shape[1]:].tolist()


def ask(model_path: Path, num_shard: int, log_path: Path) -> Answers:
    """Boots the stack on `num_shard` shards, asks every question, stops it."""
    server = Server("--model-id", str(model_path), "--num-shard", str(num_shard),
                    "--kv-cache-bytes", str(KV_CACHE_BYTES), log_path=log_path, env=SHARD_ENV)
    try:
        sequential = {p: Answer.of(generate(server, p, max_new_tokens=MAX_NEW_TOKENS, details=True))
                      for p in PROMPTS}
        concurrent = stream = None
        if num_shard == BUSY_SHARDS:
            prompts = [*PROMPTS, *PROMPTS]
            with ThreadPoolExecutor(len(prompts)) as pool:
                responses = pool.map(
                    lambda p: generate(server, p, max_new_tokens=MAX_NEW_TOKENS, details=True), prompts)
                concurrent = [(p, Answer.of(r)) for p, r in zip(prompts, responses)]
            stream = stream_events(server, PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS)
    finally:
        returncode = server.stop()
    logs = log_path.read_text(errors="replace")  # stop() closed the server's handle
    assert returncode == 0, logs
    return Answers(sequential, concurrent, stream, logs)


class Servers:
    """Answers per (model, shard count), each server booted on first need and stopped after."""

    def __init__(self, models: dict[str, Path], logs: Path) -> None:
        self.models = models
        self._logs = logs
        self._answers: dict[tuple[str, int], Answers] = {}

    def answers(self, model: str, num_shard: int) -> Answers:
        key = (model, num_shard)
        if key not in self._answers:
            log_path = self._logs / f"{model}-{num_shard}.log"
            self._answers[key] = ask(self.models[model], num_shard, log_path)
        return self._answers[key]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    if not STORIES.is_dir() or not GPT2_TOKENIZER.is_dir():
        pytest.skip(f"fixtures missing: {STORIES} or {GPT2_TOKENIZER}")
    root = tmp_path_factory.mktemp("tp-models")
    models = {"stories260K": STORIES}
    for index, (name, config) in enumerate(RANDOM_MODELS.items()):
        models[name] = save_random_model(root / name, config(), seed=index)
    yield Servers(models, tmp_path_factory.mktemp("tp-logs"))


@pytest.mark.parametrize("model", MODELS)
def test_one_shard_matches_transformers(servers: Servers, model: str) -> None:
    answers = servers.answers(model, 1)
    for prompt, answer in answers.sequential.items():
        assert answer.ids == transformers_greedy(servers.models[model], prompt), prompt


@pytest.mark.parametrize("num_shard", [n for n in SHARD_COUNTS if n > 1])
@pytest.mark.parametrize("model", MODELS)
def test_shards_match_one_shard(servers: Servers, model: str, num_shard: int) -> None:
    single = servers.answers(model, 1)
    split = servers.answers(model, num_shard)
    # The model really ran split: every rank loaded its slice.
    assert f"rank {num_shard - 1} of {num_shard}" in split.logs
    for prompt in PROMPTS:
        ours, reference = split.sequential[prompt], single.sequential[prompt]
        assert ours.ids == reference.ids, prompt
        assert (ours.text, ours.finish_reason) == (reference.text, reference.finish_reason)
        assert ours.logprobs == pytest.approx(reference.logprobs, abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_on_split_shards(servers: Servers, model: str) -> None:
    single = servers.answers(model, 1)
    concurrent = servers.answers(model, BUSY_SHARDS).concurrent
    assert concurrent is not None
    for prompt, answer in concurrent:
        assert answer.ids == single.sequential[prompt].ids, prompt
        assert answer.text == single.sequential[prompt].text


@pytest.mark.parametrize("model", MODELS)
def test_stream_on_split_shards(servers: Servers, model: str) -> None:
    reference = servers.answers(model, 1).sequential[PROMPTS[0]]
    events = servers.answers(model, BUSY_SHARDS).stream
    assert events is not None
    assert [event["token"]["id"] for event in events] == reference.ids
    assert events[-1]["generated_text"] == reference.text
    assert events[-1]["details"]["finish_reason"] == reference.finish_reason


def test_impossible_split_fails_at_start_naming_the_numbers(tmp_path: Path) -> None:
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    # stories260K has 8 query heads and 4 KV heads: 3 shards cannot share them evenly.
    argv = [sys.executable, "-m", "shardgen.launcher", "--model-id", str(STORIES),
            "--num-shard", "3", "--device", "cpu", "--hostname", "127.0.0.1",
            "--port", str(free_port()), "--kv-cache-bytes", str(KV_CACHE_BYTES),
            "--startup-timeout", "120"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=150,
                            stdin=subprocess.DEVNULL, env={**os.environ, **SHARD_ENV})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    naming = [line for line in output.splitlines()
              if re.search(r"num_attention_heads\D{0,3}8\b", line)
              and re.search(r"num_key_value_heads\D{0,3}4\b.*\b3\b", line)]
    assert naming, output
    # It failed while loading: the router never came up.
    assert "shard 0 is ready" not in output
