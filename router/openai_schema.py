"""The JSON shapes of the OpenAI API: chat completions, completions, their stream chunks.

Pure functions from the router's types to plain dicts, so that the shapes can be read and
tested in one place; field names and nesting follow OpenAI's API reference. OpenAI leaves
the stop sequence out of the returned text (TGI keeps it): `final_text` and `TextDeltas`
do that, the latter holding back streamed text that may be the start of a stop sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardgen.router.requests import FinishReason
from shardgen.router.token_stream import PrefillToken, TextToken, TopToken

JsonDict = dict[str, object]

# OpenAI's stand-in for the log-probability of a token that cannot be drawn.
_IMPOSSIBLE_LOGPROB = -9999.0


@dataclass(frozen=True)
class Choice:
    """One finished generation as an OpenAI choice."""

    index: int
    text: str                      # stop sequence left out
    finish_reason: FinishReason
    tokens: tuple[TextToken, ...]
    prefill: tuple[PrefillToken, ...] = ()


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish reasons: "length" or "stop" (EOS or a stop sequence)."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> JsonDict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprob(value: float | None) -> float | None:
    """A log-probability JSON can carry (no NaN, no -inf)."""
    if value is None or math.isnan(value):
        return None
    return value if math.isfinite(value) else _IMPOSSIBLE_LOGPROB


# ---------------------------------------------------------------- text without stop sequences


def final_text(text: str, reason: FinishReason | None, stops: Sequence[str]) -> str:
    """A choice's text as OpenAI returns it: without the stop sequence that ended it."""
    if reason is not FinishReason.STOP_SEQUENCE:
        return text
    matched = max((stop for stop in stops if text.endswith(stop)), key=len, default="")
    return text[:len(text) - len(matched)]


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of text could be the start of a stop sequence."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class TextDeltas:
    """The streamed text of one choice: what can be sent after each token.

    Text that may begin a stop sequence is held back until the next tokens show whether
    it does; a matched stop sequence is never sent.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._sent = 0

    def next(self, text: str, reason: FinishReason | None) -> str:
        """The new text to send, given the whole text so far and the finish reason."""
        if reason is None:
            end = len(text) - _partial_stop_length(text, self._stops)
        else:
            end = len(final_text(text, reason, self._stops))
        delta = text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta


# ---------------------------------------------------------------- chat


def _top_entry(token: TopToken) -> JsonDict:
    return {"token": token.text, "logprob": logprob(token.logprob),
            "bytes": list(token.text.encode())}


def chat_logprobs(tokens: Sequence[TextToken]) -> JsonDict:
    """`choices[i].logprobs` of a chat completion (or of one chunk)."""
    return {"content": [{**_top_entry(TopToken(t.id, t.text, t.logprob, t.special)),
                         "top_logprobs": [_top_entry(top) for top in t.top_tokens]}
                        for t in tokens],
            "refusal": None}


def chat_completion(completion_id: str, created: int, model: str, choices: Sequence[Choice],
                    prompt_tokens: int, logprobs: bool, fingerprint: str) -> JsonDict:
    """The body of a non-streamed chat completion."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text, "refusal": None,
                        "tool_calls": []},
            "logprobs": chat_logprobs(choice.tokens) if logprobs else None,
            "finish_reason": finish_reason(choice.finish_reason),
        } for choice in choices],
        "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices)),
    }


def chat_chunk(completion_id: str, created: int, model: str, fingerprint: str, index: int,
               delta: JsonDict, *, logprobs: JsonDict | None = None,
               reason: FinishReason | None = None, with_usage_field: bool = False) -> JsonDict:
    """One `chat.completion.chunk` of a stream, for one choice."""
    chunk: JsonDict = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created,
        "model": model, "system_fingerprint": fingerprint,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish_reason(reason)}],
    }
    if with_usage_field:
        chunk["usage"] = None  # the usage arrives in a last chunk of its own
    return chunk


def usage_chunk(completion_id: str, created: int, model: str, fingerprint: str, kind: str,
                prompt_tokens: int, completion_tokens: int) -> JsonDict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices."""
    return {"id": completion_id, "object": kind, "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


# ---------------------------------------------------------------- completions


def _offsets(texts: Sequence[str], start: int) -> list[int]:
    offsets = []
    for text in texts:
        offsets.append(start)
        start += len(text)
    return offsets


def completion_logprobs(tokens: Sequence[TextToken], prefill: Sequence[PrefillToken] = (),
                        start: int = 0) -> JsonDict:
    """`choices[i].logprobs` of a (legacy) completion: prompt tokens first when echoed.

    Generated tokens' `text_offset`s count from `start`, the length of the choice's text
    before them (the echoed prompt, earlier chunks); prompt tokens count from 0. Prompt
    tokens have no alternatives (the shards return none for them): their `top_logprobs`
    entries are null, as is the first prompt token's log-probability.
    """
    return {
        "tokens": [p.text for p in prefill] + [t.text for t in tokens],
        "token_logprobs": [logprob(p.logprob) for p in prefill] + [logprob(t.logprob)
                                                                   for t in tokens],
        "top_logprobs": [None] * len(prefill) + [
            {top.text: logprob(top.logprob) for top in t.top_tokens} for t in tokens],
        "text_offset": (_offsets([p.text for p in prefill], 0)
                        + _offsets([t.text for t in tokens], start)),
    }


def text_completion(completion_id: str, created: int, model: str, choices: Sequence[Choice],
                    prompt_tokens: int, logprobs: bool, echo_prompts: Sequence[str],
                    fingerprint: str) -> JsonDict:
    """The body of a non-streamed completion; echo_prompts holds, per choice, the prompt
    text put in front (empty strings without echo)."""
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": choice.index,
            "text": echo + choice.text,
            "logprobs": completion_logprobs(choice.tokens, choice.prefill if echo else (),
                                            len(echo)) if logprobs else None,
            "finish_reason": finish_reason(choice.finish_reason),
        } for choice, echo in zip(choices, echo_prompts, strict=True)],
        "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices)),
    }


def completion_chunk(completion_id: str, created: int, model: str, fingerprint: str,
                     index: int, text: str, *, logprobs: JsonDict | None = None,
                     reason: FinishReason | None = None,
                     with_usage_field: bool = False) -> JsonDict:
    """One chunk of a streamed completion, for one choice."""
    chunk: JsonDict = {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": index, "text": text, "logprobs": logprobs,
                     "finish_reason": finish_reason(reason)}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


# ---------------------------------------------------------------- models and errors


def model_card(model_id: str, created: int, max_model_len: int) -> JsonDict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "shardgen",
            "max_model_len": max_model_len}


def models_list(model_id: str, created: int, max_model_len: int) -> JsonDict:
    return {"object": "list", "data": [model_card(model_id, created, max_model_len)]}


def error_body(status: int, message: str, error_type: str) -> JsonDict:
    """OpenAI's error object, plus TGI's `error_type` beside it."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": status},
            "error_type": error_type}
