"""TGI-style request validation: a JSON body in, typed parameters and a GenerationRequest out.

Validation runs in two steps around tokenization. `parse_generate_body` checks the shape of
the body and every parameter on its own (names, types, ranges, the limits of the router);
after tokenization, `fit_to_limits` applies `truncate` and checks the prompt and the
generation against the token limits. Every error names the field, the value it got and the
limit it broke, so that a client can fix its request from the message alone.

Shape problems (the body is not an object, `inputs` is missing or not a string) are
`BodyShapeError` (HTTP 400); everything else is `ValidationError` (HTTP 422), like TGI.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from shardgen.router.requests import GenerationRequest, SamplingParams, StoppingParams

# The proto carries the seed as uint64 and top_k as uint32.
_MAX_SEED = 2**64 - 1
_MAX_TOP_K = 2**32 - 1
# TGI's bounds on the OpenAI-style penalties.
_PENALTY_BOUND = 2.0


class ValidationError(ValueError):
    """A parameter value the client must change (HTTP 422)."""


class BodyShapeError(ValueError):
    """The body is not the JSON object the route expects (HTTP 400)."""


@dataclass(frozen=True)
class ValidationLimits:
    """The router's limits that requests are checked against."""

    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    default_max_new_tokens: int = 100


@dataclass(frozen=True)
class GenerateParameters:
    """The `parameters` object of a /generate request, validated.

    `sampling.do_sample` is already true when a sampling parameter implies it, and
    `sampling.seed` already holds the random seed drawn for a sampled request without one.
    """

    sampling: SamplingParams
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    best_of: int = 1
    return_full_text: bool = False
    truncate: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int = 0
    ignore_eos: bool = False
    cache_priority: int = 0
    cache_priority_tokens: int | None = None

    @property
    def reported_seed(self) -> int | None:
        """The seed that `details.seed` reports: None for a greedy request."""
        return self.sampling.seed if self.sampling.do_sample else None


# Highest `cache_priority` a request may give its prompt prefix.
MAX_CACHE_PRIORITY = 100


# ---------------------------------------------------------------- JSON value types


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# Error messages quote the offending value up to this many characters: a body of megabytes
# must not come back whole in its error.
_QUOTED_CHARS = 100


def _quoted(value: object) -> str:
    text = repr(value)
    if len(text) <= _QUOTED_CHARS:
        return text
    return f"{text[:_QUOTED_CHARS]}... ({len(text)} characters)"


def _as_float(name: str, value: object) -> float:
    # bool is an int in Python, but `true` is not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be a number, got {_type_name(value)} "
                              f"{_quoted(value)}")
    try:
        number = float(value)  # an integer of hundreds of digits does not fit a float
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValidationError(f"`{name}` must be a finite number, got {_quoted(value)}")
    # Sampling parameters travel as 32-bit floats (generate.proto): a value that becomes
    # infinite or 0 there would pass the checks here and fail the shard's (the whole step).
    single = _to_float32(number)
    if math.isinf(single) or (single == 0.0 and number != 0.0):
        raise ValidationError(f"`{name}` must fit a 32-bit float (between 1.4e-45 and 3.4e+38 "
                              f"in magnitude, or 0), got {_quoted(value)}")
    return number


def _to_float32(number: float) -> float:
    """number rounded to the nearest 32-bit float (inf past its range)."""
    try:
        return float(struct.unpack("f", struct.pack("f", number))[0])
    except OverflowError:
        return math.copysign(math.inf, number)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"`{name}` must be an integer, got {_type_name(value)} "
                              f"{_quoted(value)}")
    return value


def _as_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be true or false, got {_type_name(value)} "
                              f"{_quoted(value)}")
    return value


def _as_str_list(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"`{name}` must be a list of strings, got {_quoted(value)}")
    for item in value:
        _check_unicode(name, item)
    return tuple(value)


def _check_unicode(name: str, text: str) -> None:
    """JSON escapes can spell lone surrogates (\\ud800), which are no Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValidationError(f"`{name}` is not valid Unicode: {error.reason} "
                              f"{text[error.start:error.end]!r} at character {error.start}"
                              ) from None


def _must_be_null(name: str, value: object) -> None:
    raise ValidationError(f"`{name}` is not supported by this server (got {_quoted(value)})")


# Every parameter TGI's /generate accepts (plus `min_p`, `presence_penalty` and `ignore_eos`),
# with the JSON type it must have. Unknown names are rejected, as TGI does.
_PARAMETER_TYPES: dict[str, Callable[[str, object], object]] = {
    "temperature": _as_float,
    "top_k": _as_int,
    "top_p": _as_float,
    "typical_p": _as_float,
    "min_p": _as_float,
    "repetition_penalty": _as_float,
    "frequency_penalty": _as_float,
    "presence_penalty": _as_float,
    "seed": _as_int,
    "do_sample": _as_bool,
    "max_new_tokens": _as_int,
    "stop": _as_str_list,
    "best_of": _as_int,
    "return_full_text": _as_bool,
    "truncate": _as_int,
    "details": _as_bool,
    "decoder_input_details": _as_bool,
    "top_n_tokens": _as_int,
    "watermark": _as_bool,
    "ignore_eos": _as_bool,
    # shardgen's cache priority: the prompt's first cache_priority_tokens tokens (default:
    # all of it) are evicted from the prefix cache after blocks of lower priority.
    "cache_priority": _as_int,
    "cache_priority_tokens": _as_int,
    # TGI features this server does not have; accepted only when null.
    "adapter_id": _must_be_null,
    "grammar": _must_be_null,
}


def _typed_parameters(raw: Mapping[str, object]) -> dict[str, object]:
    """Check names and JSON types; a null value means the parameter was not given."""
    unknown = sorted(set(raw) - set(_PARAMETER_TYPES))
    if unknown:
        raise ValidationError(f"unknown parameter(s) {', '.join(f'`{n}`' for n in unknown)}; "
                              f"known parameters: {', '.join(sorted(_PARAMETER_TYPES))}")
    return {name: _PARAMETER_TYPES[name](name, value)
            for name, value in raw.items() if value is not None}


# ---------------------------------------------------------------- ranges


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValidationError(f"`{name}` must be > 0.0 and < 1.0, got {value}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValidationError(f"`{name}` must be strictly positive, got {value}")


def _check_between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValidationError(f"`{name}` must be between {low} and {high}, got {value}")


# The range each numeric sampling parameter must lie in (TGI's, where TGI has one).
_SAMPLING_RANGES: dict[str, Callable[[str, float], None]] = {
    "temperature": _check_positive,
    "top_k": partial(_check_between, low=1, high=_MAX_TOP_K),
    "top_p": _check_open_unit,
    "typical_p": _check_open_unit,
    "repetition_penalty": _check_positive,
    "min_p": partial(_check_between, low=0.0, high=1.0),
    "frequency_penalty": partial(_check_between, low=-_PENALTY_BOUND, high=_PENALTY_BOUND),
    "presence_penalty": partial(_check_between, low=-_PENALTY_BOUND, high=_PENALTY_BOUND),
    "seed": partial(_check_between, low=0, high=_MAX_SEED),
}


def _check_sampling_ranges(values: Mapping[str, object]) -> None:
    for name, check in _SAMPLING_RANGES.items():
        if name in values:
            check(name, values[name])  # type: ignore[arg-type]


def _check_count_ranges(values: Mapping[str, object], limits: ValidationLimits) -> None:
    max_new = values.get("max_new_tokens")
    if isinstance(max_new, int) and max_new < 1:
        raise ValidationError(f"`max_new_tokens` must be strictly positive, got {max_new}")
    stop = values.get("stop", ())
    assert isinstance(stop, tuple)
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {limits.max_stop_sequences} stop sequences "
                              f"(--max-stop-sequences), got {len(stop)}")
    if "" in stop:
        raise ValidationError("`stop` sequences must not be empty strings")
    top_n = values.get("top_n_tokens", 0)
    assert isinstance(top_n, int)
    if not 0 <= top_n <= limits.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be between 0 and {limits.max_top_n_tokens} "
                              f"(--max-top-n-tokens), got {top_n}")
    priority = values.get("cache_priority", 0)
    assert isinstance(priority, int)
    if not 0 <= priority <= MAX_CACHE_PRIORITY:
        raise ValidationError(f"`cache_priority` must be between 0 and {MAX_CACHE_PRIORITY}, "
                              f"got {priority}")
    priority_tokens = values.get("cache_priority_tokens")
    if isinstance(priority_tokens, int) and priority_tokens < 1:
        raise ValidationError(f"`cache_priority_tokens` must be strictly positive, "
                              f"got {priority_tokens}")
    truncate = values.get("truncate")
    if isinstance(truncate, int) and not 1 <= truncate <= limits.max_input_tokens:
        raise ValidationError(f"`truncate` must be between 1 and {limits.max_input_tokens} "
                              f"(--max-input-tokens), got {truncate}")


def _check_best_of(values: Mapping[str, object], do_sample: bool, limits: ValidationLimits) -> int:
    best_of = values.get("best_of", 1)
    assert isinstance(best_of, int)
    if not 1 <= best_of <= limits.max_best_of:
        raise ValidationError(f"`best_of` must be between 1 and {limits.max_best_of} "
                              f"(--max-best-of), got {best_of}")
    if best_of > 1 and not do_sample:
        raise ValidationError(f"`best_of` > 1 needs sampling (`do_sample` or a sampling "
                              f"parameter), got best_of={best_of} on a greedy request")
    if best_of > 1 and "seed" in values:
        raise ValidationError(f"`seed` must not be set when `best_of` > 1 "
                              f"(got seed={values['seed']}, best_of={best_of})")
    return best_of


# ---------------------------------------------------------------- parameters


def _implies_sampling(values: Mapping[str, object]) -> bool:
    """TGI samples when asked to, or when a sampling parameter leaves its neutral value."""
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0, "min_p": 0.0}
    return bool(values.get("do_sample", False)) or any(
        name in values and values[name] != value for name, value in neutral.items())


def _sampling_params(values: Mapping[str, object], do_sample: bool,
                     rng: random.Random) -> SamplingParams:
    seed = values.get("seed")
    if seed is None:
        # A sampled request without a seed gets a random one, reported back in details.
        seed = rng.getrandbits(64) if do_sample else 0
    picked = {name: values[name] for name in (
        "temperature", "top_k", "top_p", "typical_p", "min_p", "repetition_penalty",
        "frequency_penalty", "presence_penalty", "watermark") if name in values}
    return SamplingParams(do_sample=do_sample, seed=seed, **picked)  # type: ignore[arg-type]


def parse_parameters(raw: object, limits: ValidationLimits,
                     rng: random.Random | None = None) -> GenerateParameters:
    """Validate a request's `parameters` object (None or {} gives the defaults).

    rng draws the seed of sampled requests that give none (default: the `random` module's).
    Raises BodyShapeError when raw is not an object, ValidationError on any bad parameter.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise BodyShapeError(f"`parameters` must be a JSON object, got {_type_name(raw)}")
    values = _typed_parameters(raw)
    _check_sampling_ranges(values)
    _check_count_ranges(values, limits)
    do_sample = _implies_sampling(values)
    best_of = _check_best_of(values, do_sample, limits)
    flags = {name: values[name] for name in (
        "max_new_tokens", "return_full_text", "truncate", "details", "decoder_input_details",
        "top_n_tokens", "ignore_eos", "cache_priority", "cache_priority_tokens")
        if name in values}
    return GenerateParameters(
        sampling=_sampling_params(values, do_sample, rng or random.Random()),
        stop=values.get("stop", ()),  # type: ignore[arg-type]
        best_of=best_of,
        **flags,  # type: ignore[arg-type]
    )


# The top-level fields of a /generate body (`stream` picks the route on `/`).
_BODY_FIELDS = frozenset({"inputs", "parameters", "stream"})


def parse_generate_body(body: object, limits: ValidationLimits,
                        rng: random.Random | None = None) -> tuple[str, GenerateParameters]:
    """Validate a TGI /generate body `{"inputs": str, "parameters": {...}}`.

    Unknown fields are rejected, at the top level (where TGI's `/` route and its clients
    add `stream`) as inside `parameters`: a misspelt field must not be silently ignored.
    """
    if not isinstance(body, Mapping):
        raise BodyShapeError(f"the body must be a JSON object with `inputs`, "
                             f"got {_type_name(body)}")
    if "inputs" not in body:
        raise BodyShapeError("the body must have an `inputs` field (the prompt)")
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(f'`{n}`' for n in unknown)} in the "
                              f"body; known fields: {', '.join(sorted(_BODY_FIELDS))}")
    inputs = body["inputs"]
    if not isinstance(inputs, str):
        raise BodyShapeError(f"`inputs` must be a string, got {_type_name(inputs)} "
                             f"{_quoted(inputs)}")
    if not inputs:
        raise ValidationError("`inputs` must not be empty")
    _check_unicode("inputs", inputs)
    return inputs, parse_parameters(body.get("parameters"), limits, rng)


def check_streamable(params: GenerateParameters) -> None:
    """Refuse what a token stream cannot carry (as TGI does)."""
    if params.best_of > 1:
        raise ValidationError(f"`best_of` > 1 is not supported when streaming tokens "
                              f"(got best_of={params.best_of})")
    if params.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when "
                              "streaming tokens")


# ---------------------------------------------------------------- token limits


def fit_to_limits(input_ids: list[int], params: GenerateParameters,
                  limits: ValidationLimits) -> tuple[list[int], int]:
    """Apply `truncate` and check the token limits; returns (input_ids, max_new_tokens).

    `truncate` keeps the last tokens of the prompt. Without `max_new_tokens` the request
    gets the router's default, lowered to fit max_total_tokens; a given one that does not
    fit is an error.
    """
    if params.truncate is not None and len(input_ids) > params.truncate:
        input_ids = input_ids[-params.truncate:]
    length = len(input_ids)
    if length > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have at most {limits.max_input_tokens} tokens "
                              f"(--max-input-tokens), got {length} tokens")
    room = limits.max_total_tokens - length
    if params.max_new_tokens is None:
        return input_ids, min(limits.default_max_new_tokens, room)
    if params.max_new_tokens > room:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens} "
            f"(--max-total-tokens); got {length} `inputs` tokens and "
            f"{params.max_new_tokens} `max_new_tokens`")
    return input_ids, params.max_new_tokens


def build_request(input_ids: list[int], max_new_tokens: int,
                  params: GenerateParameters) -> GenerationRequest:
    """The engine request for validated parameters and a prompt that fits the limits."""
    return GenerationRequest(
        input_ids=input_ids,
        sampling=params.sampling,
        stopping=StoppingParams(max_new_tokens=max_new_tokens,
                                ignore_eos_token=params.ignore_eos),
        top_n_tokens=params.top_n_tokens,
        prefill_logprobs=params.decoder_input_details,
        cache_priority=params.cache_priority,
        cache_priority_tokens=params.cache_priority_tokens,
    )
