"""POST /tokenize: the ids /generate would run, with each token's span of the prompt."""

from __future__ import annotations

import pytest

from api_http_helpers import QWEN2, call
from router_http_doubles import ScriptedEngine, token_events
from shardgen.router.tokenization import Tokenizer

PROMPT = "Once upon a time, Lily saw a big dog."


def tokenize(tokenizer: Tokenizer, body: object, **config: object):
    engine = ScriptedEngine(lambda request: token_events([5]))
    return call(tokenizer, engine, "POST", "/tokenize", body, **config)


def generated_ids(tokenizer: Tokenizer, body: dict, **config: object) -> list[int]:
    engine = ScriptedEngine(lambda request: token_events([5]))
    assert call(tokenizer, engine, "POST", "/generate", body, **config).status == 200
    return engine.submitted[0].input_ids


def test_the_tokens_are_those_generate_runs(tokenizer: Tokenizer) -> None:
    answer = tokenize(tokenizer, {"inputs": PROMPT})
    assert answer.status == 200
    tokens = answer.json()
    assert [t["id"] for t in tokens] == generated_ids(tokenizer, {"inputs": PROMPT})
    assert tokens[0] == {"id": tokenizer.hf.bos_token_id, "text": "", "start": 0, "stop": 0}
    for token in tokens:
        assert token["text"] == PROMPT[token["start"]:token["stop"]]
    assert "".join(t["text"] for t in tokens).strip() == PROMPT.strip()


def test_truncate_keeps_the_last_tokens_as_generate_does(tokenizer: Tokenizer) -> None:
    body = {"inputs": PROMPT, "parameters": {"truncate": 4}}
    tokens = tokenize(tokenizer, body).json()
    assert [t["id"] for t in tokens] == generated_ids(tokenizer, body)
    assert len(tokens) == 4


def test_special_token_strings_follow_the_router_setting() -> None:
    if not QWEN2.is_dir():
        pytest.skip(f"fixture tokenizer missing: {QWEN2}")
    qwen2 = Tokenizer.from_pretrained(QWEN2)
    body = {"inputs": "hi<|im_end|>"}
    im_end = qwen2.hf.convert_tokens_to_ids("<|im_end|>")
    for parse in (False, True):
        tokens = tokenize(qwen2, body, parse_special_tokens=parse).json()
        ids = [t["id"] for t in tokens]
        assert ids == generated_ids(qwen2, body, parse_special_tokens=parse)
        assert (im_end in ids) == parse


@pytest.mark.parametrize("body, status", [
    ({"inputs": ""}, 422), ({"inputs": "x", "parameters": {"truncate": 0}}, 422),
    ({"text": "x"}, 400), ([1], 400)])
def test_bad_bodies_are_refused_as_by_generate(tokenizer: Tokenizer, body: object,
                                               status: int) -> None:
    answer = tokenize(tokenizer, body)
    assert answer.status == status and answer.json()["error_type"] == "validation"
