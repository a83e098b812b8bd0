"""One request's engine events as text tokens: detokenization plus stop sequences.

The engine speaks token ids only. `TextStream` reads a request handle, detokenizes each
token incrementally, feeds the text to the stop-sequence matcher and, on a match, cancels
the engine request and ends the stream with finish reason "stop_sequence". It keeps what a
final response needs: the generated text (special tokens left out, cut just after the stop
sequence, which stays in the text as in TGI), the finish reason and the prompt's
log-probabilities. Route handlers (TGI-style, OpenAI-style) only shape the output.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shardgen.router.detokenizer import IncrementalDetokenizer
from shardgen.router.requests import FinishReason, GenerationError, PrefillEvent, TokenEvent
from shardgen.router.stop import StopSequenceMatcher
from shardgen.router.tokenization import Tokenizer


class RequestHandle(Protocol):
    """What the engine's handle offers: its events, and a way to cancel it."""

    id: int

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[PrefillEvent | TokenEvent]: ...


@dataclass(frozen=True)
class TopToken:
    """One of the most likely alternatives to a generated token."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TextToken:
    """A generated token with its text; finish_reason is set on the last one."""

    id: int
    text: str
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class PrefillToken:
    """A prompt token with its log-probability (None for the first one, which has none)."""

    id: int
    text: str
    logprob: float | None


class TextStream:
    """Iterate to get the text tokens of one engine request; read the results after.

    Call `close()` when done (in a finally): it cancels the engine request if the stream
    was left before its end, for example because the client went away.
    """

    def __init__(self, handle: RequestHandle, tokenizer: Tokenizer,
                 stop_sequences: Iterable[str] = (), context_ids: Sequence[int] = ()) -> None:
        self._handle = handle
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, context_ids)
        self._stops = StopSequenceMatcher(stop_sequences)
        self._text_length = 0                # characters of every piece, special ones too
        self._visible: list[str] = []        # pieces of non-special tokens
        self.finish_reason: FinishReason | None = None
        self.prefill: tuple[PrefillToken, ...] = ()
        self.generated_tokens = 0

    @property
    def generated_text(self) -> str:
        """The text so far: special tokens left out, cut after a matched stop sequence."""
        return "".join(self._visible)

    async def __aiter__(self) -> AsyncIterator[TextToken]:
        async for event in self._handle:
            if isinstance(event, PrefillEvent):
                self.prefill = self._prefill_tokens(event)
                continue
            token = self._on_token(event)
            yield token
            if token.finish_reason is not None:
                return
        if self.finish_reason is None:
            raise GenerationError(f"request {self._handle.id} ended without a finish reason")

    def close(self) -> None:
        """Cancel the engine request unless it has finished."""
        if self.finish_reason is None:
            self._handle.cancel()

    def _on_token(self, event: TokenEvent) -> TextToken:
        self.generated_tokens += 1
        special = self._tokenizer.is_special(event.id)
        text = self._detokenizer.push(event.id)
        if event.finish_reason is not None:
            text += self._detokenizer.flush()
        start = self._text_length
        self._text_length += len(text)
        if not special:
            self._visible.append(text)
        stop_end = self._stops.feed(text)
        finish = event.finish_reason
        if stop_end is not None:
            # The stop sequence ends inside this piece; the text after it is dropped.
            if not special:
                self._visible[-1] = text[:stop_end - start]
            finish = FinishReason.STOP_SEQUENCE
            if event.finish_reason is None:
                self._handle.cancel()
        self.finish_reason = finish
        return TextToken(id=event.id, text=text, logprob=event.logprob, special=special,
                         top_tokens=self._top_tokens(event), finish_reason=finish)

    def _top_tokens(self, event: TokenEvent) -> tuple[TopToken, ...]:
        # Alternatives are decoded one by one: they have no sequence around them.
        return tuple(TopToken(id=token_id, text=self._tokenizer.decode([token_id]),
                              logprob=logprob, special=self._tokenizer.is_special(token_id))
                     for token_id, logprob in event.top_tokens)

    def _prefill_tokens(self, event: PrefillEvent) -> tuple[PrefillToken, ...]:
        logprobs: list[float | None] = list(event.logprobs)
        if len(logprobs) == len(event.ids) - 1:
            logprobs.insert(0, None)  # the first prompt token is not predicted
        elif len(logprobs) != len(event.ids):
            raise GenerationError(f"prefill event has {len(event.ids)} ids but "
                                  f"{len(event.logprobs)} logprobs")
        return tuple(
            PrefillToken(id=token_id, text=self._tokenizer.decode([token_id]),
                         logprob=None if logprob is None or math.isnan(logprob) else logprob)
            for token_id, logprob in zip(event.ids, logprobs))
