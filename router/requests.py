"""The request types that pass between the router's HTTP layer and its engine.

The HTTP layer validates and tokenizes, builds a `GenerationRequest` and submits it to the
engine; the engine schedules it on the shards and yields `PrefillEvent`/`TokenEvent`s in
token ids only. Text (detokenization, stop sequences) stays in the HTTP layer, which cancels
a request through its handle when a stop sequence matches or the client goes away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from shardgen.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class StoppingParams:
    """When the shard stops a request on its own."""

    max_new_tokens: int
    ignore_eos_token: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationRequest:
    """A validated, tokenized request, ready for the queue."""

    input_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    # Cache priority of the prompt's blocks: higher is evicted later (0 = normal). It covers
    # the first cache_priority_tokens prompt tokens (None: the whole prompt).
    cache_priority: int = 0
    cache_priority_tokens: int | None = None
    # The HTTP request's trace context travels with the request (OpenTelemetry Context).
    trace_context: object | None = None
    # Absolute deadline on the loop clock (time.monotonic()), or None.
    deadline: float | None = None


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class PrefillEvent:
    """Log-probabilities of prompt tokens (sent when prefill_logprobs was asked)."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; finish_reason is set on the last one the engine sends."""

    id: int
    logprob: float
    top_tokens: tuple[tuple[int, float], ...] = field(default=())
    finish_reason: FinishReason | None = None


class GenerationError(Exception):
    """Generation failed on the shards; the HTTP layer answers 424."""

    # The `error_type` of the JSON error (or of the error event of a started stream).
    error_type = "generation"


class RequestTimeoutError(GenerationError):
    """The request passed its deadline before it finished; the HTTP layer answers 504."""

    error_type = "timeout"


class QueueFullError(Exception):
    """The engine holds --max-concurrent-requests already; the HTTP layer answers 429."""
