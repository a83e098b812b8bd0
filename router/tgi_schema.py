"""The JSON shapes of TGI's API: /generate bodies, /generate_stream events, /info.

Pure functions from the router's types to plain dicts, so that the shapes can be read (and
tested) in one place. Field names and nesting follow text-generation-inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from shardgen.router.config import RouterConfig
from shardgen.router.requests import FinishReason
from shardgen.router.token_stream import PrefillToken, TextToken, TopToken
from shardgen.router.validation import GenerateParameters

if TYPE_CHECKING:  # server imports this module
    from shardgen.router.server import ModelInfo

JsonDict = dict[str, object]


@dataclass(frozen=True)
class Sequence:
    """One finished generation of a request (best_of gives several)."""

    generated_text: str
    finish_reason: FinishReason
    tokens: list[TextToken]
    prefill: tuple[PrefillToken, ...]
    seed: int | None


def _logprob(value: float | None) -> float | None:
    # JSON has no NaN; TGI writes null for a log-probability that does not exist.
    return None if value is None or math.isnan(value) else value


def token_json(token: TextToken | TopToken) -> JsonDict:
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob),
            "special": token.special}


def _prefill_json(tokens: Iterable[PrefillToken]) -> list[JsonDict]:
    return [{"id": t.id, "text": t.text, "logprob": _logprob(t.logprob)} for t in tokens]


def _sequence_details(sequence: Sequence, params: GenerateParameters) -> JsonDict:
    details: JsonDict = {
        "finish_reason": sequence.finish_reason.value,
        "generated_tokens": len(sequence.tokens),
        "seed": sequence.seed,
        "prefill": _prefill_json(sequence.prefill) if params.decoder_input_details else [],
        "tokens": [token_json(token) for token in sequence.tokens],
    }
    if params.top_n_tokens:
        details["top_tokens"] = [[token_json(top) for top in token.top_tokens]
                                 for token in sequence.tokens]
    return details


def full_text(inputs: str, generated_text: str, params: GenerateParameters) -> str:
    """generated_text as returned: with the prompt in front when return_full_text."""
    return inputs + generated_text if params.return_full_text else generated_text


def generate_response(inputs: str, params: GenerateParameters, best: Sequence,
                      others: Iterable[Sequence] = ()) -> JsonDict:
    """The /generate body; `details` when details (or decoder_input_details) was asked."""
    body: JsonDict = {"generated_text": full_text(inputs, best.generated_text, params)}
    if params.details or params.decoder_input_details:
        details = _sequence_details(best, params)
        other_sequences = [{"generated_text": full_text(inputs, other.generated_text, params),
                            **_sequence_details(other, params)} for other in others]
        if other_sequences:
            details["best_of_sequences"] = other_sequences
        body["details"] = details
    return body


def stream_event(index: int, token: TextToken, params: GenerateParameters, *,
                 final_text: str | None = None, seed: int | None = None,
                 input_length: int = 0) -> JsonDict:
    """One /generate_stream event; the last one (token.finish_reason set) carries the
    whole text (`final_text`) and the details, whatever `details` said."""
    event: JsonDict = {"index": index, "token": token_json(token)}
    if params.top_n_tokens:
        event["top_tokens"] = [token_json(top) for top in token.top_tokens]
    event["generated_text"] = None
    event["details"] = None
    if token.finish_reason is not None:
        event["generated_text"] = final_text
        event["details"] = {"finish_reason": token.finish_reason.value,
                            "generated_tokens": index, "seed": seed,
                            "input_length": input_length}
    return event


def _version() -> str:
    try:
        return metadata.version("shardgen")
    except metadata.PackageNotFoundError:
        return "unknown"


def info_response(config: RouterConfig, model: ModelInfo) -> JsonDict:
    """The /info body: the served model and the router's limits."""
    return {
        "model_id": model.model_id,
        "model_dtype": model.dtype,
        "model_device_type": model.device_type,
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": config.max_best_of,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_tokens": config.max_input_tokens,
        "max_total_tokens": config.max_total_tokens,
        "max_batch_prefill_tokens": config.max_batch_prefill_tokens,
        "max_batch_total_tokens": config.max_batch_total_tokens,
        "max_batch_size": config.max_batch_size,
        "max_top_n_tokens": config.max_top_n_tokens,
        "waiting_served_ratio": config.waiting_served_ratio,
        "max_waiting_tokens": config.max_waiting_tokens,
        "block_size": model.block_size,
        "num_shard": model.num_shard,
        "prefix_caching": config.enable_prefix_caching,
        "scheduling_policy": config.scheduling_policy,
        "version": _version(),
        "router": "shardgen",
    }
