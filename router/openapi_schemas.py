"""The JSON schemas of /openapi.json (OpenAPI 3.1, JSON Schema 2020-12), as data.

Bounds come from the running server's limits, so that the document says what this server
accepts (a fuzzer generating from it gets the real ranges). The request schemas mirror
router/validation.py and router/openai_params.py; checks that involve two fields or the
tokenized prompt (best_of needs sampling, prompt + max_new_tokens <= max_total_tokens)
are described in words, and their violations answer 422.
"""

from __future__ import annotations

from shardgen.router.validation import MAX_CACHE_PRIORITY, ValidationLimits

JsonDict = dict[str, object]

_MAX_SEED = 2**64 - 1
_MAX_TOP_K = 2**32 - 1


def ref(name: str) -> JsonDict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **bounds: object) -> JsonDict:
    return {"type": [kind, "null"], **bounds}


def _float(**bounds: object) -> JsonDict:
    """A sampling parameter: it travels to the shards as a 32-bit float."""
    return _nullable("number", format="float", **bounds)


def _object(properties: dict[str, JsonDict], required: tuple[str, ...] = (), *,
            closed: bool = False, description: str = "") -> JsonDict:
    schema: JsonDict = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _array(items: JsonDict, **bounds: object) -> JsonDict:
    return {"type": "array", "items": items, **bounds}


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_BOOLEAN = {"type": "boolean"}
_LOGPROB = _float()
_PENALTY = _float(minimum=-2.0, maximum=2.0)
_SEED = _nullable("integer", minimum=0, maximum=_MAX_SEED)
_OPEN_UNIT = _float(exclusiveMinimum=0.0, exclusiveMaximum=1.0)


# ---------------------------------------------------------------- TGI


def _tgi_parameters(limits: ValidationLimits) -> JsonDict:
    stop = _array({"type": "string", "minLength": 1}, maxItems=limits.max_stop_sequences)
    return _object({
        "best_of": _nullable("integer", minimum=1, maximum=limits.max_best_of,
                             description="> 1 needs sampling and no seed"),
        "decoder_input_details": _nullable("boolean"),
        "details": _nullable("boolean"),
        "do_sample": _nullable("boolean"),
        "frequency_penalty": _PENALTY,
        "presence_penalty": _PENALTY,
        "max_new_tokens": _nullable("integer", minimum=1, maximum=limits.max_total_tokens - 1,
                                    description="prompt tokens + max_new_tokens must be "
                                                f"<= {limits.max_total_tokens}"),
        "repetition_penalty": _float(exclusiveMinimum=0.0),
        "return_full_text": _nullable("boolean"),
        "seed": _SEED,
        "stop": {**stop, "type": ["array", "null"]},
        "temperature": _float(exclusiveMinimum=0.0),
        "top_k": _nullable("integer", minimum=1, maximum=_MAX_TOP_K),
        "top_n_tokens": _nullable("integer", minimum=0, maximum=limits.max_top_n_tokens),
        "top_p": _OPEN_UNIT,
        "typical_p": _OPEN_UNIT,
        "min_p": _float(minimum=0.0, maximum=1.0),
        "truncate": _nullable("integer", minimum=1, maximum=limits.max_input_tokens),
        "watermark": _nullable("boolean"),
        "ignore_eos": _nullable("boolean"),
        "cache_priority": _nullable("integer", minimum=0, maximum=MAX_CACHE_PRIORITY),
        "cache_priority_tokens": _nullable("integer", minimum=1),
        "adapter_id": {"type": "null"},
        "grammar": {"type": "null"},
    }, closed=True)


def _token(with_special: bool = True) -> JsonDict:
    properties = {"id": _INTEGER, "text": _STRING, "logprob": _LOGPROB}
    if with_special:
        properties["special"] = _BOOLEAN
    return _object(properties, tuple(properties))


def _details() -> JsonDict:
    finish = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}
    return _object({
        "finish_reason": finish, "generated_tokens": _INTEGER, "seed": _nullable("integer"),
        "prefill": _array(ref("PrefillToken")), "tokens": _array(ref("Token")),
        "top_tokens": _array(_array(ref("Token"))),
        "best_of_sequences": _array(_object({
            "generated_text": _STRING, "finish_reason": finish, "generated_tokens": _INTEGER,
            "seed": _nullable("integer"), "prefill": _array(ref("PrefillToken")),
            "tokens": _array(ref("Token")), "top_tokens": _array(_array(ref("Token")))})),
    }, ("finish_reason", "generated_tokens", "seed", "prefill", "tokens"))


def tgi_schemas(limits: ValidationLimits) -> dict[str, JsonDict]:
    generate = {"inputs": {"type": "string", "minLength": 1}, "parameters": {
        "anyOf": [ref("GenerateParameters"), {"type": "null"}]}}
    parameters = _tgi_parameters(limits)
    # /tokenize checks each parameter, but not the prompt against the token limits.
    tokenize_parameters = {**parameters, "properties": {
        **parameters["properties"],  # type: ignore[dict-item]
        "max_new_tokens": _nullable("integer", minimum=1)}}
    return {
        "GenerateParameters": parameters,
        "GenerateRequest": _object(generate, ("inputs",)),
        "TokenizeParameters": tokenize_parameters,
        "TokenizeRequest": _object({**generate, "parameters": {
            "anyOf": [ref("TokenizeParameters"), {"type": "null"}]}}, ("inputs",)),
        "CompatGenerateRequest": _object({**generate, "stream": _BOOLEAN}, ("inputs",)),
        "Token": _token(),
        "PrefillToken": _token(with_special=False),
        "Details": _details(),
        "GenerateResponse": _object({"generated_text": _STRING, "details": ref("Details")},
                                    ("generated_text",)),
        "StreamResponse": _object({
            "index": _INTEGER, "token": ref("Token"), "top_tokens": _array(ref("Token")),
            "generated_text": _nullable("string"),
            "details": {"anyOf": [{"type": "null"}, _object({
                "finish_reason": {"type": "string"}, "generated_tokens": _INTEGER,
                "seed": _nullable("integer"), "input_length": _INTEGER})]},
        }, ("index", "token", "generated_text", "details"),
            description="one `data:` event of /generate_stream"),
        "SimpleToken": _object({"id": _INTEGER, "text": _STRING, "start": _INTEGER,
                                "stop": _INTEGER}, ("id", "text", "start", "stop")),
        "ErrorResponse": _object({"error": _STRING, "error_type": _STRING},
                                 ("error", "error_type")),
        "Info": _object({
            "model_id": _STRING, "model_dtype": _STRING, "model_device_type": _STRING,
            "max_concurrent_requests": _INTEGER, "max_best_of": _INTEGER,
            "max_stop_sequences": _INTEGER, "max_input_tokens": _INTEGER,
            "max_total_tokens": _INTEGER, "max_batch_prefill_tokens": _INTEGER,
            "max_batch_total_tokens": _nullable("integer"),
            "max_batch_size": _nullable("integer"), "max_top_n_tokens": _INTEGER,
            "waiting_served_ratio": {"type": "number"}, "max_waiting_tokens": _INTEGER,
            "block_size": _INTEGER, "num_shard": _INTEGER, "prefix_caching": _BOOLEAN,
            "version": _STRING, "router": _STRING,
        }, ("model_id", "model_dtype", "max_input_tokens", "max_total_tokens", "version")),
        "Status": _object({"status": _STRING}, ("status",)),
        "CancelResponse": _object({"request_id": _STRING, "cancelled": _BOOLEAN,
                                   "engine_requests": _INTEGER},
                                  ("request_id", "cancelled", "engine_requests")),
    }


# ---------------------------------------------------------------- OpenAI


def _openai_common(limits: ValidationLimits) -> dict[str, JsonDict]:
    """The request fields that chat and completions share."""
    stop = _array({"type": "string", "minLength": 1}, maxItems=limits.max_stop_sequences)
    return {
        "model": _nullable("string"),
        "max_tokens": _nullable("integer", minimum=1, maximum=limits.max_total_tokens),
        "temperature": _float(minimum=0.0, maximum=2.0,
                                 description="0 is greedy; sampling by default"),
        "top_p": _float(exclusiveMinimum=0.0, maximum=1.0),
        "n": _nullable("integer", minimum=1, maximum=limits.max_best_of),
        "stop": {"anyOf": [{"type": "string", "minLength": 1}, stop, {"type": "null"}]},
        "seed": _SEED,
        "frequency_penalty": _PENALTY,
        "presence_penalty": _PENALTY,
        "stream": _nullable("boolean"),
        "stream_options": {"anyOf": [{"type": "null"}, _object(
            {"include_usage": _BOOLEAN}, closed=True)], "description": "only with stream"},
        "logit_bias": {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]},
        "user": _nullable("string"),
        "top_k": _nullable("integer", minimum=1, maximum=_MAX_TOP_K),
        "min_p": _float(minimum=0.0, maximum=1.0),
        "typical_p": _OPEN_UNIT,
        "repetition_penalty": _float(exclusiveMinimum=0.0),
        "cache_priority": _nullable("integer", minimum=0, maximum=MAX_CACHE_PRIORITY),
        "cache_priority_tokens": _nullable("integer", minimum=1),
    }


def _chat_request(limits: ValidationLimits) -> JsonDict:
    text_part = _object({"type": {"const": "text"}, "text": _STRING}, ("type", "text"))
    message = _object({
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [_STRING, _array(text_part)]},
        "name": _STRING,
    }, ("role", "content"), closed=True)
    top = min(20, limits.max_top_n_tokens)
    return _object({
        **_openai_common(limits),
        "messages": _array(message, minItems=1),
        "max_completion_tokens": _nullable("integer", minimum=1,
                                           maximum=limits.max_total_tokens),
        "logprobs": _nullable("boolean"),
        "top_logprobs": _nullable("integer", minimum=0, maximum=top,
                                  description="needs logprobs: true"),
        "response_format": {"anyOf": [{"type": "null"}, _object(
            {"type": {"const": "text"}}, ("type",))],
            "description": "json_object and json_schema answer 422 (no structured output)"},
        "tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]},
        "tool_choice": {"anyOf": [{"type": "null"}, {"enum": ["none", "auto"]}]},
        "parallel_tool_calls": _nullable("boolean"),
        "tool_prompt": _nullable("string"),
    }, ("messages",), closed=True)


def _completion_request(limits: ValidationLimits) -> JsonDict:
    prompt = {"type": "string", "minLength": 1}
    return _object({
        **_openai_common(limits),
        "prompt": {"anyOf": [prompt, _array(prompt, minItems=1)]},
        "echo": _nullable("boolean"),
        "logprobs": _nullable("integer", minimum=0, maximum=min(5, limits.max_top_n_tokens)),
        "suffix": {"anyOf": [{"type": "null"}, {"const": ""}]},
        "best_of": _nullable("integer", minimum=1, maximum=limits.max_best_of,
                             description="must equal n"),
    }, ("prompt",), closed=True)


def _usage() -> JsonDict:
    return _object({"prompt_tokens": _INTEGER, "completion_tokens": _INTEGER,
                    "total_tokens": _INTEGER},
                   ("prompt_tokens", "completion_tokens", "total_tokens"))


def _chat_logprobs() -> JsonDict:
    top = _object({"token": _STRING, "logprob": _LOGPROB, "bytes": _array(_INTEGER)},
                  ("token", "logprob", "bytes"))
    entry = {**top, "properties": {**top["properties"], "top_logprobs": _array(top)}}  # type: ignore[dict-item]
    return {"anyOf": [{"type": "null"}, _object({"content": _array(entry),
                                                 "refusal": {"type": "null"}}, ("content",))]}


def _completion_logprobs() -> JsonDict:
    return {"anyOf": [{"type": "null"}, _object({
        "tokens": _array(_STRING), "token_logprobs": _array(_LOGPROB),
        "top_logprobs": _array({"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": _LOGPROB}]}),
        "text_offset": _array(_INTEGER)}, ("tokens", "token_logprobs", "top_logprobs",
                                           "text_offset"))]}


def _envelope(kind: str, choice: JsonDict, usage_required: bool) -> JsonDict:
    usage = ref("Usage") if usage_required else {"anyOf": [{"type": "null"}, ref("Usage")]}
    required = ("id", "object", "created", "model", "choices") + (
        ("usage",) if usage_required else ())
    return _object({"id": _STRING, "object": {"const": kind}, "created": _INTEGER,
                    "model": _STRING, "system_fingerprint": _STRING,
                    "choices": _array(choice), "usage": usage}, required)


def openai_schemas(limits: ValidationLimits) -> dict[str, JsonDict]:
    finish = {"type": ["string", "null"], "enum": ["stop", "length", None]}
    message = _object({"role": {"const": "assistant"}, "content": _STRING},
                      ("role", "content"))
    delta = _object({"role": {"const": "assistant"}, "content": _STRING})
    text_choice = _object({"index": _INTEGER, "text": _STRING,
                           "logprobs": _completion_logprobs(), "finish_reason": finish},
                          ("index", "text", "logprobs", "finish_reason"))
    return {
        "ChatCompletionRequest": _chat_request(limits),
        "CompletionRequest": _completion_request(limits),
        "Usage": _usage(),
        "ChatCompletion": _envelope("chat.completion", _object(
            {"index": _INTEGER, "message": message, "logprobs": _chat_logprobs(),
             "finish_reason": finish}, ("index", "message", "logprobs", "finish_reason")),
            usage_required=True),
        "ChatCompletionChunk": _envelope("chat.completion.chunk", _object(
            {"index": _INTEGER, "delta": delta, "logprobs": _chat_logprobs(),
             "finish_reason": finish}, ("index", "delta", "finish_reason")),
            usage_required=False),
        "Completion": _envelope("text_completion", text_choice, usage_required=True),
        "CompletionChunk": _envelope("text_completion", text_choice, usage_required=False),
        "Model": _object({"id": _STRING, "object": {"const": "model"}, "created": _INTEGER,
                          "owned_by": _STRING, "max_model_len": _INTEGER},
                         ("id", "object", "created", "owned_by")),
        "ModelList": _object({"object": {"const": "list"}, "data": _array(ref("Model"))},
                             ("object", "data")),
        "OpenAIError": _object({
            "error": _object({"message": _STRING, "type": _STRING,
                              "param": _nullable("string"), "code": _nullable("integer")},
                             ("message", "type")),
            "error_type": _STRING}, ("error", "error_type")),
    }
