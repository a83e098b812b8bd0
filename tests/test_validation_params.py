"""TGI-style parameter validation: types, ranges, implied sampling, seeds, token limits."""

from __future__ import annotations

import random

import pytest

from shardgen.router.requests import SamplingParams
from shardgen.router.validation import (BodyShapeError, GenerateParameters, ValidationError,
                                        ValidationLimits, build_request, check_streamable,
                                        fit_to_limits, parse_generate_body, parse_parameters)

LIMITS = ValidationLimits(max_input_tokens=10, max_total_tokens=16, max_stop_sequences=2,
                          max_top_n_tokens=3, max_best_of=2, default_max_new_tokens=5)


def parse(**raw: object) -> GenerateParameters:
    return parse_parameters(raw, LIMITS, random.Random(0))


def test_defaults_are_greedy_and_neutral() -> None:
    params = parse()
    assert params.sampling == SamplingParams()
    assert params.reported_seed is None
    assert (params.max_new_tokens, params.stop, params.best_of, params.top_n_tokens) == (
        None, (), 1, 0)
    assert parse_parameters(None, LIMITS) == parse_parameters({}, LIMITS)


def test_nulls_count_as_not_given() -> None:
    assert parse(temperature=None, seed=None, stop=None, adapter_id=None, grammar=None) == parse()


@pytest.mark.parametrize("raw", [
    {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.9}, {"typical_p": 0.5}, {"min_p": 0.1},
    {"do_sample": True},
])
def test_a_sampling_parameter_implies_sampling(raw: dict[str, object]) -> None:
    params = parse(**raw)
    assert params.sampling.do_sample
    for name, value in raw.items():
        if name != "do_sample":
            assert getattr(params.sampling, name) == value


@pytest.mark.parametrize("raw", [{"temperature": 1.0}, {"min_p": 0.0},
                                 {"repetition_penalty": 1.2}, {"frequency_penalty": 0.5}])
def test_neutral_values_and_penalties_stay_greedy(raw: dict[str, object]) -> None:
    # As in TGI: only a warper that changes the distribution turns sampling on.
    assert not parse(**raw).sampling.do_sample


def test_sampling_without_a_seed_draws_one_and_reports_it() -> None:
    first = parse_parameters({"do_sample": True}, LIMITS, random.Random(1))
    second = parse_parameters({"do_sample": True}, LIMITS, random.Random(2))
    assert first.sampling.seed != second.sampling.seed
    assert 0 <= first.sampling.seed < 2**64
    assert first.reported_seed == first.sampling.seed
    given = parse(do_sample=True, seed=42)
    assert given.sampling.seed == 42 and given.reported_seed == 42
    assert parse(seed=42).reported_seed is None  # greedy: the seed does not matter


@pytest.mark.parametrize("raw, words", [
    ({"temperature": 0}, ["temperature", "positive", "0"]),
    ({"temperature": -1.5}, ["temperature", "-1.5"]),
    ({"temperature": True}, ["temperature", "number", "bool"]),
    ({"temperature": float("nan")}, ["temperature", "finite"]),
    ({"top_k": 0}, ["top_k", "0"]),
    ({"top_k": 2**40}, ["top_k", str(2**40), str(2**32 - 1)]),
    ({"top_k": 2.5}, ["top_k", "integer"]),
    ({"top_p": 0.0}, ["top_p", "0.0"]),
    ({"top_p": 1.0}, ["top_p", "< 1.0"]),
    ({"typical_p": 1.5}, ["typical_p", "1.5"]),
    ({"min_p": -0.1}, ["min_p", "-0.1"]),
    ({"repetition_penalty": 0}, ["repetition_penalty"]),
    ({"frequency_penalty": 2.5}, ["frequency_penalty", "2.0", "2.5"]),
    ({"presence_penalty": -3}, ["presence_penalty", "-2.0", "-3"]),
    ({"seed": -1}, ["seed", "-1"]),
    ({"seed": 2**64}, ["seed", str(2**64)]),
    ({"max_new_tokens": 0}, ["max_new_tokens", "0"]),
    ({"max_new_tokens": "5"}, ["max_new_tokens", "integer", "str"]),
    ({"stop": "end"}, ["stop", "list"]),
    ({"stop": ["a", 1]}, ["stop", "list of strings"]),
    ({"stop": ["a", "b", "c"]}, ["stop", "2", "3"]),
    ({"stop": [""]}, ["stop", "empty"]),
    ({"top_n_tokens": 4}, ["top_n_tokens", "3", "4"]),
    ({"truncate": 0}, ["truncate", "10", "0"]),
    ({"truncate": 11}, ["truncate", "10", "11"]),
    ({"details": "yes"}, ["details", "true or false"]),
    ({"best_of": 3, "do_sample": True}, ["best_of", "2", "3"]),
    ({"best_of": 2}, ["best_of", "sampling"]),
    ({"best_of": 2, "do_sample": True, "seed": 1}, ["seed", "best_of"]),
    ({"adapter_id": "lora-1"}, ["adapter_id", "not supported"]),
    ({"max_tokens": 3, "n": 2}, ["`max_tokens`", "`n`", "unknown"]),
])
def test_bad_parameters_name_the_field_and_the_limit(raw: dict[str, object],
                                                     words: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        parse(**raw)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_body_shape() -> None:
    inputs, params = parse_generate_body({"inputs": "Hi", "parameters": {"top_k": 2},
                                          "stream": False}, LIMITS)
    assert inputs == "Hi" and params.sampling.top_k == 2
    for body in ([], "Hi", {"input": "Hi"}, {"inputs": None}, {"inputs": ["Hi"]},
                 {"inputs": "Hi", "parameters": "top_k=2"}):
        with pytest.raises(BodyShapeError):
            parse_generate_body(body, LIMITS)
    with pytest.raises(ValidationError, match="inputs"):
        parse_generate_body({"inputs": ""}, LIMITS)


def test_streams_refuse_best_of_and_prompt_details() -> None:
    check_streamable(parse(do_sample=True, details=True))
    with pytest.raises(ValidationError, match="best_of"):
        check_streamable(parse(best_of=2, do_sample=True))
    with pytest.raises(ValidationError, match="decoder_input_details"):
        check_streamable(parse(decoder_input_details=True))


def test_fit_to_limits_defaults_and_errors() -> None:
    ids = list(range(8))
    assert fit_to_limits(ids, parse(), LIMITS) == (ids, 5)            # the default
    assert fit_to_limits(ids[:4], parse(max_new_tokens=12), LIMITS) == (ids[:4], 12)
    short_room = ValidationLimits(max_input_tokens=10, max_total_tokens=11,
                                  default_max_new_tokens=5)
    assert fit_to_limits(ids, parse(), short_room) == (ids, 3)        # default lowered to fit
    with pytest.raises(ValidationError) as error:
        fit_to_limits(ids, parse(max_new_tokens=9), LIMITS)
    assert all(word in str(error.value) for word in ("16", "8", "9", "max_new_tokens"))
    with pytest.raises(ValidationError) as error:
        fit_to_limits(list(range(11)), parse(), LIMITS)
    assert all(word in str(error.value) for word in ("10", "11", "inputs"))


def test_truncate_keeps_the_last_tokens_before_the_length_check() -> None:
    ids = list(range(30))
    kept, max_new = fit_to_limits(ids, parse(truncate=4), LIMITS)
    assert kept == [26, 27, 28, 29] and max_new == 5
    assert fit_to_limits(ids[:3], parse(truncate=4), LIMITS)[0] == ids[:3]


def test_build_request_carries_every_setting() -> None:
    params = parse(temperature=0.5, seed=9, ignore_eos=True, top_n_tokens=2,
                   decoder_input_details=True, watermark=True)
    request = build_request([1, 2, 3], 6, params)
    assert request.input_ids == [1, 2, 3]
    assert request.sampling == SamplingParams(temperature=0.5, do_sample=True, seed=9,
                                              watermark=True)
    assert request.stopping.max_new_tokens == 6 and request.stopping.ignore_eos_token
    assert request.top_n_tokens == 2 and request.prefill_logprobs


def test_cache_priority_reaches_the_engine_request() -> None:
    from shardgen.router.validation import build_request

    limits = ValidationLimits(max_input_tokens=100, max_total_tokens=200)
    params = parse_parameters({"cache_priority": 10, "cache_priority_tokens": 32}, limits)
    request = build_request([1, 2, 3], 5, params)
    assert (request.cache_priority, request.cache_priority_tokens) == (10, 32)
    assert build_request([1], 5, parse_parameters({}, limits)).cache_priority == 0


@pytest.mark.parametrize("raw, message", [
    ({"cache_priority": 101}, "`cache_priority` must be between 0 and 100, got 101"),
    ({"cache_priority": -1}, "`cache_priority` must be between 0 and 100, got -1"),
    ({"cache_priority_tokens": 0}, "`cache_priority_tokens` must be strictly positive, got 0"),
])
def test_cache_priority_bounds(raw: dict, message: str) -> None:
    limits = ValidationLimits(max_input_tokens=100, max_total_tokens=200)
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        parse_parameters(raw, limits)
