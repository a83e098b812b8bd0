"""Incremental detokenization against the tokenizers' own `decode`, on real tokenizers.

The reference for every check is `tokenizer.decode` of the whole id sequence: pieces
emitted token by token must concatenate to exactly that text, and must never show the
replacement character for a character that later tokens complete.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import pytest

from shardgen.router.detokenizer import IncrementalDetokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZERS = {
    "llama2": SHARED / "tokenizers" / "llama2",     # sentencepiece with byte fallback
    "llama3": SHARED / "tokenizers" / "llama3",     # byte-level BPE (tiktoken-style)
    "qwen2": SHARED / "tokenizers" / "qwen2",       # byte-level BPE
    "gpt2": SHARED / "tokenizers" / "gpt2",         # byte-level BPE, slow-style config
    "stories": SHARED / "models" / "stories260K",   # tiny sentencepiece, vocab 512
}
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "héllo wörld — naïve café, 世界你好, 🤗🚀 and 👩‍👩‍👧 families",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "Ünïcödé at the start, then ASCII, then 日本語のテキスト.",
]


@lru_cache(maxsize=None)
def load(name: str):  # -> a transformers tokenizer
    path = TOKENIZERS[name]
    if not path.is_dir():
        pytest.skip(f"fixture tokenizer missing: {path}")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def pieces_of(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, context)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces[-1] += detokenizer.flush()
    return pieces


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_decode(name: str, text: str) -> None:
    tokenizer = load(name)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    if "\ufffd" not in tokenizer.decode(ids):
        # No piece shows half a character that a later token completes.
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gpt2"])
def test_a_multibyte_character_waits_for_its_last_byte(name: str) -> None:
    tokenizer = load(name)
    ids = tokenizer("𓀀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the fixture should split the character over byte tokens"
    assert pieces_of(tokenizer, ids) == [""] * (len(ids) - 1) + ["𓀀"]


@pytest.mark.parametrize("name", ["llama3", "stories"])
def test_an_incomplete_character_at_the_end_is_flushed(name: str) -> None:
    tokenizer = load(name)
    ids = tokenizer("a 世", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # the generation stopped inside the character
    detokenizer = IncrementalDetokenizer(tokenizer)
    emitted = "".join(detokenizer.push(token_id) for token_id in cut)
    assert emitted + detokenizer.flush() == tokenizer.decode(cut)
    assert detokenizer.flush() == ""


RARE_CHARS = "𓀀🦩ꙮ龘𝔘é世"


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Random tokens (as high-temperature sampling gives) that still spell valid UTF-8:
    whole tokens, plus the byte tokens of rare characters, which must be reassembled."""
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.2:
            ids += tokenizer(rng.choice(RARE_CHARS), add_special_tokens=False)["input_ids"]
            continue
        token_id = rng.randrange(len(tokenizer))
        if "\ufffd" not in tokenizer.decode([token_id]):
            ids.append(token_id)
    return ids


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_random_token_sequences(name: str) -> None:
    tokenizer = load(name)
    rng = random.Random(1234)
    for _ in range(20):
        ids = random_ids(tokenizer, rng, rng.randint(1, 25))
        pieces = pieces_of(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids), ids
        assert not any("\ufffd" in piece for piece in pieces), ids


@pytest.mark.parametrize("name", ["llama2", "stories", "llama3"])
def test_context_gives_the_text_as_inside_the_whole_sequence(name: str) -> None:
    tokenizer = load(name)
    prompt = tokenizer("Once upon a time")["input_ids"]
    generated = tokenizer(" there was a dog named Max.", add_special_tokens=False)["input_ids"]
    pieces = pieces_of(tokenizer, generated, context=prompt[-5:])
    whole = tokenizer.decode(prompt + generated)
    assert "".join(pieces) == whole[len(tokenizer.decode(prompt)):]
    assert pieces[0].startswith(" ")  # the word's space, which decode(generated) drops


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_special_tokens_are_emitted_unless_skipped(name: str) -> None:
    tokenizer = load(name)
    eos = tokenizer.eos_token_id
    ids = (tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [eos]
           + tokenizer(" again", add_special_tokens=False)["input_ids"])
    assert "".join(pieces_of(tokenizer, ids)) == tokenizer.decode(ids)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    skipped = "".join(detokenizer.push(token_id) for token_id in ids)
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True)


def test_the_decoded_window_stays_short() -> None:
    # Each step decodes from the previous piece on, not the whole generation.
    tokenizer = load("llama3")
    lengths: list[int] = []

    class Recording:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer("word " * 300, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(Recording())
    text = "".join(detokenizer.push(token_id) for token_id in ids)
    assert text == tokenizer.decode(ids)
    assert max(lengths) <= 2
