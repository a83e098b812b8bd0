"""The router's tokenizer wrapper: the ids transformers gives, special tokens, threads."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from shardgen.router.tokenization import Tokenizer, _backend_encode

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load(name: str, **kwargs: int) -> Tokenizer:
    path = SHARED / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"fixture tokenizer missing: {path}")
    from transformers import AutoTokenizer
    return Tokenizer(AutoTokenizer.from_pretrained(str(path)), **kwargs)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return load("llama3", inline_encode_max_chars=100)


def test_encode_adds_bos_like_transformers(llama3: Tokenizer) -> None:
    for text in ["Hello", "Hello " * 200]:  # inline, and on the worker thread
        expected = llama3.hf(text)["input_ids"]
        assert expected[0] == llama3.hf.bos_token_id
        assert llama3.encode_sync(text) == expected
        assert asyncio.run(llama3.encode(text)) == expected


@pytest.mark.parametrize("name", ["llama3", "llama2", "qwen2", "gpt2"])
def test_encode_gives_transformers_ids_through_the_backend(name: str) -> None:
    tokenizer = load(name)
    hf = tokenizer.hf
    assert tokenizer._backend_encode is not None and tokenizer._backend_encode_literal is not None
    rng = random.Random(0)
    specials = list(hf.all_special_tokens)
    for i in range(60):
        text = hf.decode([rng.randrange(hf.vocab_size) for _ in range(rng.randrange(1, 60))])
        if i % 3 == 0:
            text = rng.choice(specials) + text + " " + rng.choice(specials)
        if i % 4 == 0:
            text = "  \n" + text + "\t 日本語 🙂 12345  "
        for add, parse in [(True, True), (False, True), (True, False), (False, False)]:
            expected = hf(text, add_special_tokens=add, split_special_tokens=not parse)["input_ids"]
            assert tokenizer.encode_sync(text, add, parse_special_tokens=parse) == expected


def test_encode_keeps_transformers_where_the_backend_gives_other_ids(llama3: Tokenizer) -> None:
    class Lowercasing:
        """A tokenizer whose transformers side changes the text before the backend sees it."""

        def __init__(self, hf: Any) -> None:
            self.hf = hf
            self.backend_tokenizer = hf.backend_tokenizer
            self.all_special_tokens = hf.all_special_tokens

        def __call__(self, text: str, **kwargs: Any) -> Any:
            return self.hf(text.lower(), **kwargs)

    assert _backend_encode(llama3.hf) is not None
    assert _backend_encode(Lowercasing(llama3.hf)) is None


def test_special_tokens_include_added_special_ones(llama3: Tokenizer) -> None:
    hf = llama3.hf
    assert llama3.is_special(hf.bos_token_id) and llama3.is_special(hf.eos_token_id)
    eot = hf.convert_tokens_to_ids("<|eot_id|>")  # an added special token, not a named one
    assert llama3.is_special(eot)
    assert not llama3.is_special(hf("Hello", add_special_tokens=False)["input_ids"][0])


def test_long_encodes_leave_the_loop_free_and_agree_with_decodes(llama3: Tokenizer) -> None:
    # Encodes on the worker thread while the loop thread decodes, as under load.
    texts = [f"Story number {i}: " + "the cat sat on the mat. " * 300 for i in range(8)]

    async def main() -> tuple[list[list[int]], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                llama3.decode([791, 8415, 7731])
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        encoded = await asyncio.gather(*(llama3.encode(text) for text in texts))
        ticker.cancel()
        return list(encoded), ticks

    encoded, ticks = asyncio.run(main())
    assert encoded == [llama3.hf(text)["input_ids"] for text in texts]
    assert ticks > len(texts)  # the loop kept running while the thread encoded


@pytest.mark.parametrize("name", ["llama3", "llama2", "qwen2", "gpt2"])
def test_decode_gives_what_transformers_decode_gives(name: str) -> None:
    tokenizer = load(name)
    hf = tokenizer.hf
    rng = random.Random(0)
    specials = sorted(tokenizer.special_ids)[:8]
    for _ in range(50):
        ids = [rng.randrange(hf.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip)


def test_decode_keeps_transformers_clean_up_where_it_applies() -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a", "b", ".", "?", "n't", "'s", "don", "it"]
    backend = Backend(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                 clean_up_tokenization_spaces=True)
    tokenizer = Tokenizer(hf)
    ids = [1, 3, 2, 4]                               # "a . b ?"
    assert backend.decode(ids) != hf.decode(ids)     # the clean-up changes this text
    assert tokenizer._backend_decode is None
    assert tokenizer.decode(ids) == hf.decode(ids) == "a. b?"


def test_parallel_workers_encode_both_modes_as_transformers_does() -> None:
    # Several workers encode at once on the two shared copies (special tokens parsed or
    # literal), with truncation set on the backend as some tokenizer files set it.
    path = SHARED / "tokenizers" / "llama3"
    if not path.is_dir():
        pytest.skip(f"fixture tokenizer missing: {path}")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(path))
    hf.backend_tokenizer.enable_truncation(8)   # a call would have to turn it off first
    tokenizer = Tokenizer(hf, workers=4, inline_encode_max_chars=10)
    texts = [f"<|eot_id|> note {i}: " + "words and more words " * (20 + i) for i in range(24)]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(
            tokenizer.encode(text, parse_special_tokens=i % 2 == 0)
            for i, text in enumerate(texts))))

    try:
        encoded = asyncio.run(main())
    finally:
        tokenizer.close()
    reference = AutoTokenizer.from_pretrained(str(path))
    for i, (text, ids) in enumerate(zip(texts, encoded)):
        assert ids == reference(text, split_special_tokens=i % 2 == 1)["input_ids"]
    assert min(map(len, encoded)) > 50   # not truncated to 8
    eot = reference.convert_tokens_to_ids("<|eot_id|>")
    assert eot in encoded[0] and eot not in encoded[1]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        load("gpt2", workers=0)
