"""OpenAI-style request bodies (/v1/chat/completions, /v1/completions), validated.

Each body is checked field by field under OpenAI's names, types and ranges, then turned
into the TGI parameters the rest of the router speaks (`GenerateParameters`), so that both
APIs sample the same way. Where the two differ, OpenAI's meaning wins on these routes:
requests sample by default, `temperature: 0` is greedy, `top_p: 1` means no top-p,
`stop` may be one string, and the stop sequence is left out of the returned text (the
handlers do that). TGI's extra sampling parameters (`top_k`, `min_p`, `typical_p`,
`repetition_penalty`) are accepted too, as vLLM and TGI accept them, and so is shardgen's
`cache_priority` / `cache_priority_tokens`.

Unknown fields are rejected (as OpenAI does); fields of OpenAI features this server does
not have (tools, logit_bias, structured output) are accepted only when empty.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from shardgen.router.chat_template import Message, parse_messages
from shardgen.router.validation import (BodyShapeError, GenerateParameters, ValidationError,
                                        ValidationLimits, _quoted, parse_parameters)

_MAX_SEED = 2**64 - 1
# OpenAI's own ceilings: top_logprobs of chat, logprobs of completions.
_MAX_CHAT_TOP_LOGPROBS = 20
_MAX_COMPLETION_LOGPROBS = 5
# Parameters of the TGI routes that these routes accept under the same names.
_TGI_EXTENSIONS = ("top_k", "min_p", "typical_p", "repetition_penalty", "cache_priority",
                   "cache_priority_tokens")
# Filters that mean nothing to a greedy request (temperature 0).
_SAMPLING_ONLY = ("top_p", "top_k", "min_p", "typical_p")


@dataclass(frozen=True)
class OpenAIOptions:
    """What an OpenAI request asks for beyond the generation parameters."""

    model: str | None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    # The name under which the request gave its token budget (for error messages).
    max_tokens_field: str = "max_tokens"


@dataclass(frozen=True)
class ChatRequest:
    """A validated /v1/chat/completions body."""

    messages: list[Message]
    params: GenerateParameters
    options: OpenAIOptions


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions body (one or several prompts)."""

    prompts: tuple[str, ...]
    params: GenerateParameters
    options: OpenAIOptions


# ---------------------------------------------------------------- field readers


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _number(body: Mapping[str, object], name: str, low: float, high: float, *,
            low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be a number, got {_kind(value)} {_quoted(value)}")
    above_low = low < value if low_open else low <= value
    if not (above_low and value <= high):  # also NaN, infinities and huge integers
        bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
        raise ValidationError(f"`{name}` must be {bounds}, got {_quoted(value)}")
    return float(value)


def _integer(body: Mapping[str, object], name: str, low: int, high: int,
             why: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"`{name}` must be an integer, got {_kind(value)} "
                              f"{_quoted(value)}")
    if not low <= value <= high:
        raise ValidationError(f"`{name}` must be between {low} and {high}{why}, "
                              f"got {_quoted(value)}")
    return value


def _boolean(body: Mapping[str, object], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be true or false, got {_kind(value)} "
                              f"{_quoted(value)}")
    return value


def _string(body: Mapping[str, object], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"`{name}` must be a string, got {_kind(value)} {_quoted(value)}")
    return value


def _must_be_empty(body: Mapping[str, object], name: str, feature: str) -> None:
    value = body.get(name)
    if value not in (None, [], {}):
        raise ValidationError(f"`{name}` is not supported: this server has no {feature} "
                              f"(got {_quoted(value)})")


def _check_names(body: Mapping[str, object], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(f'`{n}`' for n in unknown)}; "
                              f"known fields: {', '.join(sorted(known))}")


def _object(body: object, route: str) -> Mapping[str, object]:
    if not isinstance(body, Mapping):
        raise BodyShapeError(f"the body of {route} must be a JSON object, got {_kind(body)}")
    return body


# ---------------------------------------------------------------- shared fields

_COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty",
    "presence_penalty", "stream", "stream_options", "logit_bias", "user", "logprobs",
    *_TGI_EXTENSIONS})


def _stop(body: Mapping[str, object]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, list):
        return stop  # the items are checked with the TGI parameters
    if isinstance(stop, str):
        return [stop]
    raise ValidationError(f"`stop` must be a string or a list of strings, got {_quoted(stop)}")


def _stream_options(body: Mapping[str, object], stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ValidationError("`stream_options` is only allowed when `stream` is true")
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise ValidationError(f"`stream_options` must be {{\"include_usage\": bool}}, "
                              f"got {_quoted(options)}")
    return bool(_boolean(options, "include_usage"))


def _sampling(body: Mapping[str, object]) -> dict[str, object]:
    """The TGI sampling parameters of an OpenAI body (OpenAI samples unless temperature is 0)."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    seed = _integer(body, "seed", 0, _MAX_SEED)
    tgi: dict[str, object] = {name: body[name] for name in (
        *_TGI_EXTENSIONS, "frequency_penalty", "presence_penalty") if body.get(name) is not None}
    if temperature == 0.0:
        for name in _SAMPLING_ONLY:
            tgi.pop(name, None)
        return {**tgi, "do_sample": False}
    if temperature is not None:
        tgi["temperature"] = temperature
    if top_p is not None and top_p < 1.0:
        tgi["top_p"] = top_p
    if seed is not None:
        tgi["seed"] = seed
    return {**tgi, "do_sample": True}


def _options(body: Mapping[str, object], limits: ValidationLimits, **extra: object
             ) -> OpenAIOptions:
    n = _integer(body, "n", 1, limits.max_best_of,
                 " (--max-best-of bounds the generations of one request)")
    stream = bool(_boolean(body, "stream"))
    _string(body, "user")
    _must_be_empty(body, "logit_bias", "logit bias")
    include_usage = _stream_options(body, stream)
    return OpenAIOptions(model=_string(body, "model"), n=n or 1, stream=stream,
                         include_usage=include_usage, **extra)  # type: ignore[arg-type]


def _parameters(body: Mapping[str, object], limits: ValidationLimits, max_tokens: int | None,
                top_n_tokens: int, prompt_logprobs: bool,
                rng: random.Random | None) -> GenerateParameters:
    tgi = _sampling(body)
    if max_tokens is not None:
        tgi["max_new_tokens"] = max_tokens
    stop = _stop(body)
    if stop is not None:
        tgi["stop"] = stop
    tgi["top_n_tokens"] = top_n_tokens
    tgi["decoder_input_details"] = prompt_logprobs
    return parse_parameters(tgi, limits, rng)


def _top_logprobs_limit(limits: ValidationLimits, ceiling: int) -> tuple[int, str]:
    if limits.max_top_n_tokens < ceiling:
        return limits.max_top_n_tokens, " (--max-top-n-tokens)"
    return ceiling, ""


# ---------------------------------------------------------------- chat


_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "tool_prompt"}


def _response_format(body: Mapping[str, object]) -> None:
    value = body.get("response_format")
    if value is None:
        return
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return
    if kind in ("json_object", "json_schema"):
        raise ValidationError(f"`response_format` of type {kind!r} needs structured output, "
                              f"which this server does not have yet; leave it out or use "
                              f"{{\"type\": \"text\"}}")
    raise ValidationError(f"`response_format` must be {{\"type\": \"text\"}}, "
                          f"got {_quoted(value)}")


def _tools(body: Mapping[str, object]) -> None:
    _must_be_empty(body, "tools", "tool calling")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise ValidationError(f"`tool_choice` must be \"none\" or \"auto\": this server has "
                              f"no tool calling (got {_quoted(choice)})")
    _boolean(body, "parallel_tool_calls")
    _string(body, "tool_prompt")


def parse_chat_body(body: object, limits: ValidationLimits,
                    rng: random.Random | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body (BodyShapeError 400, ValidationError 422)."""
    body = _object(body, "/v1/chat/completions")
    _check_names(body, _CHAT_FIELDS)
    messages = parse_messages(body.get("messages"))
    _response_format(body)
    _tools(body)
    # OpenAI renamed max_tokens; the new name wins when both are given, as in vLLM.
    max_completion = _integer(body, "max_completion_tokens", 1, limits.max_total_tokens)
    max_tokens = _integer(body, "max_tokens", 1, limits.max_total_tokens)
    max_field = "max_tokens"
    if max_completion is not None:
        max_field, max_tokens = "max_completion_tokens", max_completion
    logprobs = bool(_boolean(body, "logprobs"))
    high, why = _top_logprobs_limit(limits, _MAX_CHAT_TOP_LOGPROBS)
    top_logprobs = _integer(body, "top_logprobs", 0, high, why)
    if top_logprobs is not None and not logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs: true`")
    top_n = top_logprobs or 0
    options = _options(body, limits, logprobs=logprobs, top_logprobs=top_n,
                       max_tokens_field=max_field)
    params = _parameters(body, limits, max_tokens, top_n, False, rng)
    return ChatRequest(messages, params, options)


# ---------------------------------------------------------------- completions


_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def _prompts(body: Mapping[str, object]) -> tuple[str, ...]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, str) for p in prompts):
        raise ValidationError(f"`prompt` must be a string or a non-empty list of strings "
                              f"(token-id prompts are not supported), got {_quoted(prompt)}")
    if any(not p for p in prompts):
        raise ValidationError("`prompt` must not be empty")
    return tuple(prompts)


def parse_completion_body(body: object, limits: ValidationLimits,
                          rng: random.Random | None = None) -> CompletionRequest:
    """Validate a /v1/completions body (BodyShapeError 400, ValidationError 422)."""
    body = _object(body, "/v1/completions")
    _check_names(body, _COMPLETION_FIELDS)
    prompts = _prompts(body)
    if body.get("suffix") not in (None, ""):
        raise ValidationError(f"`suffix` is not supported (got {_quoted(body['suffix'])})")
    max_tokens = _integer(body, "max_tokens", 1, limits.max_total_tokens)
    high, why = _top_logprobs_limit(limits, _MAX_COMPLETION_LOGPROBS)
    logprobs = _integer(body, "logprobs", 0, high, why)
    echo = bool(_boolean(body, "echo"))
    options = _options(body, limits, logprobs=logprobs is not None,
                       top_logprobs=logprobs or 0, echo=echo)
    best_of = _integer(body, "best_of", 1, limits.max_best_of)
    if best_of is not None and best_of != options.n:
        raise ValidationError(f"`best_of` different from `n` is not supported "
                              f"(got best_of={best_of}, n={options.n})")
    params = _parameters(body, limits, max_tokens, logprobs or 0,
                         echo and logprobs is not None, rng)
    return CompletionRequest(prompts, params, options)


# ---------------------------------------------------------------- after tokenization


def max_new_tokens(prompt_tokens: int, params: GenerateParameters, limits: ValidationLimits,
                   prompt_field: str, max_field: str) -> int:
    """The generation budget of a prompt of prompt_tokens tokens, checked against the limits.

    Without a max_tokens the request gets the router's default, lowered to what fits.
    """
    if prompt_tokens > limits.max_input_tokens:
        raise ValidationError(f"`{prompt_field}` must have at most {limits.max_input_tokens} "
                              f"tokens (--max-input-tokens), got {prompt_tokens} tokens")
    room = limits.max_total_tokens - prompt_tokens
    if params.max_new_tokens is None:
        return min(limits.default_max_new_tokens, room)
    if params.max_new_tokens > room:
        raise ValidationError(
            f"the prompt's tokens + `{max_field}` must be <= {limits.max_total_tokens} "
            f"(--max-total-tokens); got {prompt_tokens} prompt tokens and "
            f"{max_field}={params.max_new_tokens}")
    return params.max_new_tokens


def choice_seeds(params: GenerateParameters, n: int) -> list[int]:
    """One seed per choice: seed, seed + 1, ... (the request's seed, given or drawn), so
    that a seeded request with n choices is reproducible and its choices differ."""
    return [(params.sampling.seed + i) % (_MAX_SEED + 1) for i in range(n)]
