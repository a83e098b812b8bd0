"""The router's tokenizer: a Hugging Face tokenizer, with slow encodes kept off the loop.

Prompts are encoded exactly as `tokenizer(text)["input_ids"]` encodes them (BOS added when
the tokenizer adds it by default), so that the server sees the ids transformers' own
`generate` would see. Encoding a long prompt takes milliseconds of CPU; those run on one
worker thread so that the event loop keeps streaming tokens meanwhile, and every long
prompt that arrives while the thread is busy goes into its next call: one
`tokenizer(texts)` call, which the tokenizers library runs outside the GIL and in
parallel over the cores. A burst of prompts so costs about one encode, not one each in
turn behind the loop thread. Short prompts are encoded inline, where a thread hop would
cost more than the encode.

Special tokens written in the text ("</s>", "<|im_end|>") are parsed as those tokens by
default, as transformers and TGI do; text that a client wrote and that must not be able
to forge control tokens is encoded with `parse_special_tokens=False`, which keeps such
strings as plain text. Each mode has its own copy of the tokenizer: transformers switches
the mode by mutating the tokenizer, which two threads encoding at once would race on.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Prompts longer than this (in characters) are encoded on the worker thread.
INLINE_ENCODE_MAX_CHARS = 2048


class Tokenizer:
    """Encodes prompts and names the special tokens; wraps a transformers tokenizer."""

    def __init__(self, hf_tokenizer: Any, *,
                 inline_encode_max_chars: int = INLINE_ENCODE_MAX_CHARS) -> None:
        self.hf = hf_tokenizer
        self._inline_max = inline_encode_max_chars
        # One thread: encodes of one tokenizer object are never concurrent with each other.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._batches = _EncodeBatches(self._executor, self._encode_many)
        self.special_ids: frozenset[int] = _special_token_ids(hf_tokenizer)
        self._hf_literal = _literal_special_tokens(hf_tokenizer)
        self._backend_decode = _backend_decode(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load with `AutoTokenizer.from_pretrained(path)` (a folder with tokenizer files)."""
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer loads

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode_sync(self, text: str, add_special_tokens: bool = True, *,
                    parse_special_tokens: bool = True) -> list[int]:
        """Token ids of text, special tokens (BOS) added as the tokenizer does by default.

        add_special_tokens=False encodes text that already holds them (a rendered chat
        template starts with its own BOS). parse_special_tokens=False encodes the strings
        of special tokens found in text as plain text, never as the special ids.
        """
        hf = self.hf if parse_special_tokens else self._hf_literal
        return list(hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def encode(self, text: str, add_special_tokens: bool = True, *,
                     parse_special_tokens: bool = True) -> list[int]:
        """Like `encode_sync`; a long text goes to the worker thread's next batch."""
        if len(text) <= self._inline_max:
            return self.encode_sync(text, add_special_tokens,
                                    parse_special_tokens=parse_special_tokens)
        return await self._batches.encode(_Encode(text, add_special_tokens, parse_special_tokens))

    def _encode_many(self, jobs: Sequence[_Encode]) -> list[list[int] | Exception]:
        """The ids of every job (worker thread), or the error of a job that cannot encode.

        Jobs of one mode go in one call; if that call fails, its jobs are encoded one by
        one, so that a text the tokenizer rejects fails alone."""
        results: list[list[int] | Exception] = [[] for _ in jobs]
        modes: dict[tuple[bool, bool], list[int]] = {}
        for index, job in enumerate(jobs):
            modes.setdefault((job.add_special_tokens, job.parse_special_tokens), []).append(index)
        for (add_special, parse_special), indexes in modes.items():
            hf = self.hf if parse_special else self._hf_literal
            try:
                encoded = hf([jobs[i].text for i in indexes],
                             add_special_tokens=add_special)["input_ids"]
                for i, ids in zip(indexes, encoded, strict=True):
                    results[i] = list(ids)
            except Exception:  # noqa: BLE001 - retried one by one below, each error kept
                for i in indexes:
                    try:
                        results[i] = self.encode_sync(jobs[i].text, add_special,
                                                      parse_special_tokens=parse_special)
                    except Exception as error:  # noqa: BLE001 - handed to that job's caller
                        results[i] = error
        return results

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
        """Like `offsets_sync`, on the worker thread when text is long."""
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
        """Stop the worker thread (waits for an encode in progress)."""
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class _Encode:
    """One long text waiting for the worker thread, with its encoding mode."""

    text: str
    add_special_tokens: bool
    parse_special_tokens: bool


class _EncodeBatches:
    """Runs encodes on the worker thread, all those waiting at once in one call.

    Only the event loop's thread touches `_waiting` and `_busy`: a batch is started there
    and its results are handed out there (the executor future's done-callback), so the
    worker thread never sees the queue.
    """

    def __init__(self, executor: ThreadPoolExecutor,
                 encode_many: Callable[[Sequence[_Encode]], list[list[int] | Exception]]) -> None:
        self._executor = executor
        self._encode_many = encode_many
        self._waiting: list[tuple[_Encode, asyncio.Future[list[int]]]] = []
        self._busy = False

    async def encode(self, job: _Encode) -> list[int]:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[int]] = loop.create_future()
        self._waiting.append((job, result))
        if not self._busy:
            self._start(loop)
        return await result

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._waiting = self._waiting, []
        try:
            done = self._executor.submit(self._encode_many, [job for job, _ in batch])
        except RuntimeError as error:  # the executor was shut down
            _hand_out(batch, [error] * len(batch))
            return
        self._busy = True

        def back_on_the_loop(done: Future[list[list[int] | Exception]]) -> None:
            try:
                loop.call_soon_threadsafe(self._finished, loop, batch, done)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for these results any more

        done.add_done_callback(back_on_the_loop)

    def _finished(self, loop: asyncio.AbstractEventLoop,
                  batch: list[tuple[_Encode, asyncio.Future[list[int]]]],
                  done: Future[list[list[int] | Exception]]) -> None:
        self._busy = False
        error = done.exception()
        _hand_out(batch, [error] * len(batch) if error is not None else done.result())
        if self._waiting:
            self._start(loop)


def _hand_out(batch: list[tuple[_Encode, asyncio.Future[list[int]]]],
              results: Sequence[list[int] | BaseException]) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue  # its caller went away (cancelled)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _special_token_ids(hf_tokenizer: Any) -> frozenset[int]:
    """The named special tokens, plus added tokens flagged special (chat markers, reserved)."""
    ids = set(getattr(hf_tokenizer, "all_special_ids", ()))
    added = getattr(hf_tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(token_id for token_id, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


# Text that transformers' clean-up of tokenization spaces changes (" ." -> ".", " n't" ...).
_CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"


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


def _literal_special_tokens(hf_tokenizer: Any) -> Any:
    """A copy of the tokenizer that encodes special-token strings as plain text."""
    literal = copy.deepcopy(hf_tokenizer)
    literal.split_special_tokens = True
    return literal
