"""Incremental detokenization: the text each new token adds, as TGI and vLLM compute it.

Decoding token by token is wrong for two kinds of tokenizers: byte-level BPE splits a
multi-byte character over several tokens (each one alone decodes to U+FFFD), and
sentencepiece drops the leading space of the first token it decodes. So every step decodes
a short window twice, `ids[prefix:read]` (text already emitted, as context) and
`ids[prefix:]`, and emits the difference; while the window ends inside a character the
difference ends in U+FFFD and nothing is emitted until a later token completes it.

The concatenation of the emitted pieces equals `tokenizer.decode(context + ids)` minus
`tokenizer.decode(context)`; with no context (the default) that is
`tokenizer.decode(ids)`, the text TGI returns as `generated_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The one method of a Hugging Face tokenizer that detokenization needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text pieces, one call per token.

    context_ids: tokens that precede the generated ones (e.g. the end of the prompt) and
        whose text is not emitted; they only make the first pieces come out as they would
        inside the whole sequence (a sentencepiece word's leading space).
    skip_special_tokens: passed to `decode`; when false a special token's text (e.g.
        "</s>") is emitted like any other.
    """

    def __init__(self, tokenizer: Decoder, context_ids: Sequence[int] = (),
                 skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(context_ids)
        # ids[prefix:read] decode to text already emitted (or context); ids[read:] do not yet.
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe "", maybe several chars)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Return the text of tokens still held back (an incomplete character at the end
        of the generation decodes to U+FFFD here); call once, after the last push."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):] if text.startswith(prefix_text) else text
