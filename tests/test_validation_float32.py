"""Sampling parameters must survive the trip to the shards as 32-bit floats.

A value such as 5e-324 passes a "> 0" check as a double but is 0.0 as a float32, and the
shard then refuses the whole step (every request in it); the fuzz run of docs/fuzzing.md
found this. The router refuses such values itself, on both APIs.
"""

from __future__ import annotations

import struct

import pytest

from shardgen.router.openai_params import parse_chat_body
from shardgen.router.validation import ValidationError, ValidationLimits, parse_parameters

LIMITS = ValidationLimits(max_input_tokens=100, max_total_tokens=128)


def as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@pytest.mark.parametrize("name, value", [
    ("repetition_penalty", 5e-324), ("top_p", 5e-324), ("typical_p", 1e-46),
    ("temperature", 1e39), ("repetition_penalty", 1.17e308), ("frequency_penalty", -1e-300)])
def test_a_value_that_float32_cannot_hold_is_422(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"`{name}` must fit a 32-bit float"):
        parse_parameters({name: value}, LIMITS)


def test_the_openai_routes_refuse_it_too() -> None:
    with pytest.raises(ValidationError, match="`top_p` must fit a 32-bit float"):
        parse_chat_body({"messages": [{"role": "user", "content": "x"}], "top_p": 5e-324},
                        LIMITS)


@pytest.mark.parametrize("name, value", [
    ("repetition_penalty", 1e-44), ("temperature", 3e38), ("top_p", 0.999999999),
    ("presence_penalty", 0.0)])
def test_values_float32_holds_pass_and_stay_in_range_there(name: str, value: float) -> None:
    sampling = parse_parameters({name: value}, LIMITS).sampling
    assert getattr(sampling, name) == value
    single = as_float32(value)
    assert single != 0.0 or value == 0.0
    assert single <= 1.0 if name == "top_p" else single > 0.0 or value == 0.0
