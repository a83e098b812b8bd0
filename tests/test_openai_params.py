"""OpenAI request bodies → TGI parameters: defaults, ranges, unsupported features, budgets."""

from __future__ import annotations

import random

import pytest

from shardgen.router.openai_params import (choice_seeds, max_new_tokens, parse_chat_body,
                                           parse_completion_body)
from shardgen.router.validation import BodyShapeError, ValidationError, ValidationLimits

LIMITS = ValidationLimits(max_input_tokens=100, max_total_tokens=128, max_stop_sequences=2,
                          max_top_n_tokens=3, max_best_of=4, default_max_new_tokens=20)
MESSAGES = [{"role": "user", "content": "Hello"}]


def chat(**fields: object):
    return parse_chat_body({"messages": MESSAGES, **fields}, LIMITS, random.Random(0))


def completion(**fields: object):
    return parse_completion_body({"prompt": "Once", **fields}, LIMITS, random.Random(0))


def test_requests_sample_by_default_as_openai_does() -> None:
    request = chat()
    sampling = request.params.sampling
    assert sampling.do_sample and sampling.temperature == 1.0
    assert (sampling.top_p, sampling.top_k) == (1.0, 0)
    assert request.options.n == 1 and not request.options.stream
    assert request.params.max_new_tokens is None
    # A sampled request without a seed gets one drawn from the rng.
    assert sampling.seed == random.Random(0).getrandbits(64)


def test_temperature_zero_is_greedy_and_drops_the_filters() -> None:
    request = chat(temperature=0, top_p=0.5, top_k=3, seed=7, frequency_penalty=0.5)
    sampling = request.params.sampling
    assert not sampling.do_sample
    assert (sampling.top_p, sampling.top_k) == (1.0, 0)
    assert sampling.frequency_penalty == 0.5  # penalties still shape a greedy choice


def test_sampling_fields_reach_the_tgi_parameters() -> None:
    params = chat(temperature=0.7, top_p=0.9, seed=42, presence_penalty=-1.5, top_k=5,
                  min_p=0.1, repetition_penalty=1.2, stop="END", max_tokens=9).params
    sampling = params.sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.7, 0.9, 42)
    assert (sampling.presence_penalty, sampling.top_k, sampling.min_p) == (-1.5, 5, 0.1)
    assert sampling.repetition_penalty == 1.2
    assert params.stop == ("END",) and params.max_new_tokens == 9


def test_top_p_one_means_no_top_p() -> None:
    assert chat(top_p=1.0).params.sampling.top_p == 1.0


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = chat(max_tokens=5, max_completion_tokens=7)
    assert request.params.max_new_tokens == 7
    assert request.options.max_tokens_field == "max_completion_tokens"
    assert chat(max_tokens=5).options.max_tokens_field == "max_tokens"


def test_logprobs_ask_for_top_tokens() -> None:
    request = chat(logprobs=True, top_logprobs=2)
    assert request.options.logprobs and request.params.top_n_tokens == 2
    assert chat(logprobs=True).params.top_n_tokens == 0
    body = completion(logprobs=3, echo=True)
    assert body.params.top_n_tokens == 3 and body.params.decoder_input_details
    # Echo alone needs no prompt log-probabilities.
    assert not completion(echo=True).params.decoder_input_details


def test_stream_options_ask_for_the_usage_chunk() -> None:
    assert chat(stream=True, stream_options={"include_usage": True}).options.include_usage
    assert not chat(stream=True).options.include_usage


def test_completion_prompts_may_be_a_list() -> None:
    assert completion(prompt=["a", "b"]).prompts == ("a", "b")
    assert completion().prompts == ("Once",)


def test_fields_that_clients_send_empty_are_accepted() -> None:
    request = chat(model="any", tools=[], tool_choice="none", logit_bias={}, user="u",
                   response_format={"type": "text"}, parallel_tool_calls=False,
                   tool_prompt="ignored", stream_options=None)
    assert request.options.model == "any"


@pytest.mark.parametrize("fields, words", [
    ({"temperature": 2.5}, ["temperature", "2.0", "2.5"]),
    ({"temperature": float("nan")}, ["temperature"]),
    ({"top_p": 0}, ["top_p", "> 0.0"]),
    ({"n": 5}, ["n", "4", "--max-best-of"]),
    ({"n": 0}, ["n"]),
    ({"max_tokens": 0}, ["max_tokens"]),
    ({"max_completion_tokens": 10**30}, ["max_completion_tokens", "128"]),
    ({"seed": -1}, ["seed"]),
    ({"frequency_penalty": 3}, ["frequency_penalty", "2.0"]),
    ({"stop": ["a", "b", "c"]}, ["stop", "--max-stop-sequences"]),
    ({"stop": 5}, ["stop"]),
    ({"stop": ""}, ["stop", "empty"]),
    ({"top_logprobs": 2}, ["top_logprobs", "logprobs: true"]),
    ({"logprobs": True, "top_logprobs": 4}, ["top_logprobs", "3", "--max-top-n-tokens"]),
    ({"response_format": {"type": "json_object"}}, ["response_format", "json_object",
                                                    "structured output"]),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, ["json_schema"]),
    ({"tools": [{"type": "function"}]}, ["tools", "tool calling"]),
    ({"tool_choice": "required"}, ["tool_choice"]),
    ({"logit_bias": {"1": 5}}, ["logit_bias"]),
    ({"stream_options": {"include_usage": True}}, ["stream_options", "stream"]),
    ({"max_tokenz": 5}, ["max_tokenz", "known fields"]),
    ({"stream": "yes"}, ["stream", "true or false"]),
    ({"top_k": 0}, ["top_k"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["messages[0].role", "tool"]),
    ({"messages": [{"role": "user", "content": None}]}, ["messages[0].content"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     ["messages[0].content[0]", "text-only"]),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     ["messages[0].tool_calls", "not supported"]),
])
def test_bad_chat_fields_are_422_naming_the_field(fields: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        chat(**fields)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("fields, words", [
    ({"prompt": []}, ["prompt"]),
    ({"prompt": [1, 2, 3]}, ["prompt", "token-id"]),
    ({"prompt": ""}, ["prompt", "empty"]),
    ({"logprobs": 6}, ["logprobs", "3"]),
    ({"logprobs": True}, ["logprobs", "integer"]),
    ({"suffix": "x"}, ["suffix"]),
    ({"best_of": 2}, ["best_of", "n"]),
    ({"messages": MESSAGES}, ["messages"]),
])
def test_bad_completion_fields_are_422_naming_the_field(fields: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        completion(**fields)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_a_body_that_is_not_an_object_is_400() -> None:
    with pytest.raises(BodyShapeError):
        parse_chat_body([MESSAGES], LIMITS)
    with pytest.raises(BodyShapeError):
        parse_completion_body("Once", LIMITS)


def test_error_messages_quote_long_values_briefly() -> None:
    with pytest.raises(ValidationError) as error:
        chat(stop=7, user="x" * 10_000, messages=[{"role": "user", "content": ["y" * 10_000]}])
    assert len(str(error.value)) < 400


def test_the_budget_fills_what_the_limits_leave_and_refuses_what_they_do_not() -> None:
    params = chat().params
    assert max_new_tokens(10, params, LIMITS, "messages", "max_tokens") == 20
    assert max_new_tokens(100, params, LIMITS, "messages", "max_tokens") == 20
    tight = ValidationLimits(max_input_tokens=100, max_total_tokens=105)
    assert max_new_tokens(100, params, tight, "messages", "max_tokens") == 5
    with pytest.raises(ValidationError, match="`messages` must have at most 100"):
        max_new_tokens(101, params, LIMITS, "messages", "max_tokens")
    with pytest.raises(ValidationError, match="max_completion_tokens=30") as error:
        max_new_tokens(100, chat(max_completion_tokens=30).params, LIMITS, "messages",
                       "max_completion_tokens")
    assert "128" in str(error.value)


def test_choices_draw_with_consecutive_seeds() -> None:
    assert choice_seeds(chat(seed=10).params, 3) == [10, 11, 12]
    assert choice_seeds(chat(seed=2**64 - 1).params, 2) == [2**64 - 1, 0]
    drawn = chat().params
    assert choice_seeds(drawn, 2) == [drawn.sampling.seed,
                                      (drawn.sampling.seed + 1) % 2**64]
