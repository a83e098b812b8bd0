"""SamplingParams, shared by the router and the shard, against the contract's message."""

from __future__ import annotations

from dataclasses import fields

from shardgen.common.sampling_params import SamplingParams
from shardgen.proto import generate_pb2


def test_the_fields_are_those_of_the_contract_in_its_order() -> None:
    message = generate_pb2.NextTokenChooserParameters.DESCRIPTOR
    assert [f.name for f in fields(SamplingParams)] == [f.name for f in message.fields]


def test_a_round_trip_through_the_contract_keeps_every_value() -> None:
    params = SamplingParams(temperature=0.5, top_k=7, top_p=0.75, typical_p=0.5, min_p=0.25,
                            repetition_penalty=1.5, frequency_penalty=-0.5,
                            presence_penalty=0.25, do_sample=True, seed=2**64 - 1,
                            watermark=True)
    assert SamplingParams.from_proto(params.to_proto()) == params
    # The neutral defaults travel too, though proto3's own default is zero.
    assert SamplingParams.from_proto(SamplingParams().to_proto()) == SamplingParams()
