"""The router's tokenizer: a Hugging Face tokenizer, with slow encodes kept off the loop.

Prompts are encoded exactly as `tokenizer(text)["input_ids"]` encodes them (BOS added when
the tokenizer adds it by default), so that the server sees the ids transformers' own
`generate` would see: through the tokenizers library's encode without offsets where that
gives the same ids (checked when the tokenizer loads; a 2,272-token Llama 3 prompt took 2.2
ms that way against 3.7 through transformers on the development machine), else through
transformers. Encoding a long prompt takes milliseconds of CPU; those run on
worker threads (one by default) so that the event loop keeps streaming tokens meanwhile,
one prompt per call: a burst's first prompts are admitted while the later ones encode
(measured on an H100 box, encoding every waiting prompt in one `tokenizer(texts)` call
made each wait for the whole burst: 250 ms from arrival to admission against 91). The
Rust encode runs outside the GIL, so several workers encode in parallel, one core each
(2,200-token prompts on two cores: 40 in 104 ms with two workers, 207 ms with one).
Short prompts are encoded inline, where a thread hop would cost more than the encode.

Special tokens written in the text ("</s>", "<|im_end|>") are parsed as those tokens by
default, as transformers and TGI do; text that a client wrote and that must not be able
to forge control tokens is encoded with `parse_special_tokens=False`, which keeps such
strings as plain text. Each mode has its own copy of the tokenizer: transformers switches
the mode by mutating the tokenizer, which two threads encoding at once would race on
(the tokenizers library raises "Already borrowed"). For the same reason each copy encodes
once when it is made, which settles what transformers sets on the first call (truncation,
padding, the mode), so that the workers' encodes only ever read it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Prompts longer than this (in characters) are encoded on a worker thread.
INLINE_ENCODE_MAX_CHARS = 2048
# Worker threads that encode long prompts (the router's --tokenizer-workers). One by
# default: on an H100 box under the shared-prefix load (bursts of ~40 prompts of 2,176
# tokens), four workers cut arrival-to-validated from 87 to 62 ms mean but raised the time
# to first token from 230 / 122 ms (mean / median) to 332 / 263: the burst reached the
# scheduler at once and waited for one long mixed step instead of several short ones
# (measured again on the tenth pass: 221 / 120 against 327 / 272 ms; one worker's wait is
# its queue, the encode itself ~10 ms there; benchmark/NOTES.md).
DEFAULT_WORKERS = 1


class Tokenizer:
    """Encodes prompts and names the special tokens; wraps a transformers tokenizer."""

    def __init__(self, hf_tokenizer: Any, *, workers: int = DEFAULT_WORKERS,
                 inline_encode_max_chars: int = INLINE_ENCODE_MAX_CHARS) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.hf = _settled(hf_tokenizer)
        self._inline_max = inline_encode_max_chars
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        self.special_ids: frozenset[int] = _special_token_ids(hf_tokenizer)
        self._hf_literal = _settled(_literal_special_tokens(hf_tokenizer))
        self._backend_encode = _backend_encode(self.hf)
        self._backend_encode_literal = _backend_encode(self._hf_literal)
        self._backend_decode = _backend_decode(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, workers: int = DEFAULT_WORKERS) -> Tokenizer:
        """Load with `AutoTokenizer.from_pretrained(path)` (a folder with tokenizer files)."""
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer loads

        return cls(AutoTokenizer.from_pretrained(str(path)), workers=workers)

    def encode_sync(self, text: str, add_special_tokens: bool = True, *,
                    parse_special_tokens: bool = True) -> list[int]:
        """Token ids of text, special tokens (BOS) added as the tokenizer does by default.

        add_special_tokens=False encodes text that already holds them (a rendered chat
        template starts with its own BOS). parse_special_tokens=False encodes the strings
        of special tokens found in text as plain text, never as the special ids.
        """
        backend = self._backend_encode if parse_special_tokens else self._backend_encode_literal
        if backend is not None:
            return backend(text, add_special_tokens)
        hf = self.hf if parse_special_tokens else self._hf_literal
        return list(hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def encode(self, text: str, add_special_tokens: bool = True, *,
                     parse_special_tokens: bool = True) -> list[int]:
        """Like `encode_sync`, on a worker thread when text is long."""
        if len(text) <= self._inline_max:
            return self.encode_sync(text, add_special_tokens,
                                    parse_special_tokens=parse_special_tokens)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self.encode_sync, text, add_special_tokens,
                                              parse_special_tokens=parse_special_tokens))

    def offsets_sync(self, text: str, *, parse_special_tokens: bool = True
                     ) -> list[tuple[int, int, int]]:
        """(id, start, stop) of every token of text as `encode_sync(text)` encodes it: the
        characters text[start:stop] that it covers (an empty span for an added BOS)."""
        hf = self.hf if parse_special_tokens else self._hf_literal
        encoding = hf(text, add_special_tokens=True, return_offsets_mapping=True)
        return [(token_id, start, stop) for token_id, (start, stop)
                in zip(encoding["input_ids"], encoding["offset_mapping"])]

    async def offsets(self, text: str, *, parse_special_tokens: bool = True
                      ) -> list[tuple[int, int, int]]:
        """Like `offsets_sync`, on a worker thread when text is long."""
        call = functools.partial(self.offsets_sync, text,
                                 parse_special_tokens=parse_special_tokens)
        if len(text) <= self._inline_max:
            return call()
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (the `Decoder` that IncrementalDetokenizer needs): what
        `tokenizer.decode` gives, from the tokenizers library directly where that is the
        same text (twice per streamed token, transformers' wrapper cost more than the
        decode itself)."""
        if self._backend_decode is not None:
            return str(self._backend_decode(token_ids, skip_special_tokens=skip_special_tokens))
        return str(self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def is_special(self, token_id: int) -> bool:
        """Whether a token is a special one (BOS, EOS, chat markers...), as TGI reports it."""
        return token_id in self.special_ids

    def close(self) -> None:
        """Stop the worker threads (waits for the encodes in progress)."""
        self._executor.shutdown(wait=True)


def _special_token_ids(hf_tokenizer: Any) -> frozenset[int]:
    """The named special tokens, plus added tokens flagged special (chat markers, reserved)."""
    ids = set(getattr(hf_tokenizer, "all_special_ids", ()))
    added = getattr(hf_tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(token_id for token_id, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


# Text that transformers' clean-up of tokenization spaces changes (" ." -> ".", " n't" ...).
_CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"


def _backend_encode(hf_tokenizer: Any) -> Callable[[str, bool], list[int]] | None:
    """The tokenizers library's encode without offsets, `(text, add_special_tokens) -> ids`,
    when it gives the ids `hf_tokenizer(text)` gives; else None.

    transformers passes a fast tokenizer's text to the same backend and adds offsets that
    the router does not use; checked on text that holds the tokenizer's special-token
    strings, runs of spaces, tabs, newlines, digits and non-Latin characters, in both modes
    of adding special tokens. `hf_tokenizer` must be settled (its backend's mode set)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    encode_batch_fast = getattr(backend, "encode_batch_fast", None)
    if encode_batch_fast is None:
        return None

    def encode(text: str, add_special_tokens: bool) -> list[int]:
        return list(encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids)

    probe = " ".join(getattr(hf_tokenizer, "all_special_tokens", ())) + _ENCODE_PROBE
    for add_special_tokens in (True, False):
        expected = list(hf_tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"])
        if encode(probe, add_special_tokens) != expected:
            return None
    return encode


# Text for _backend_encode's check.
_ENCODE_PROBE = "  Hello,\tworld!\n\n  It's 2026-11-25: 12345 + 678 = ?  Été, 日本語, Ω, 🙂.  "


def _backend_decode(hf_tokenizer: Any) -> Any:
    """The tokenizers library's decode when `hf_tokenizer.decode` adds nothing to it (a
    fast tokenizer whose decode applies no clean-up of spaces); else None.

    Checked on text that the clean-up would change, so that whichever rule a transformers
    version applies (it skips the clean-up for BPE models), what streams is what
    `tokenizer.decode` gives."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    ids = list(hf_tokenizer(_CLEAN_UP_PROBE, add_special_tokens=False)["input_ids"])
    for skip in (False, True):
        if backend.decode(ids, skip_special_tokens=skip) != hf_tokenizer.decode(
                ids, skip_special_tokens=skip):
            return None
    return backend.decode


def _settled(hf_tokenizer: Any) -> Any:
    """The tokenizer, after one encode and one encode with offsets: whatever transformers
    changes on the backend at a call (truncation and padding off, the special-tokens mode)
    is changed now, on one thread, and later calls of the same kinds only read it."""
    hf_tokenizer("a", add_special_tokens=True)
    hf_tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
    return hf_tokenizer


def _literal_special_tokens(hf_tokenizer: Any) -> Any:
    """A copy of the tokenizer that encodes special-token strings as plain text."""
    literal = copy.deepcopy(hf_tokenizer)
    literal.split_special_tokens = True
    return literal
