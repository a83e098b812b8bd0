"""How one request picks its tokens: the router builds it from the HTTP parameters, the
shard reads it back from the contract's NextTokenChooserParameters (the meaning of each
field is in generate.proto)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shardgen.proto import generate_pb2


@dataclass(frozen=True)
class SamplingParams:
    """The fields of NextTokenChooserParameters by name. The defaults are the neutral
    values, not proto3's zeros: to_proto sets every field."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    do_sample: bool = False
    seed: int = 0
    watermark: bool = False

    @classmethod
    def from_proto(cls, p: generate_pb2.NextTokenChooserParameters) -> SamplingParams:
        return cls(**{f.name: getattr(p, f.name) for f in fields(cls)})

    def to_proto(self) -> generate_pb2.NextTokenChooserParameters:
        return generate_pb2.NextTokenChooserParameters(**asdict(self))

    @property
    def samples(self) -> bool:
        """True for a seeded draw, False for a greedy pick."""
        return self.do_sample and self.temperature > 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether frequency/presence penalties need generated-token counts."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of its range."""
        _require(self.repetition_penalty > 0.0,
                 f"repetition_penalty must be > 0 (1.0 disables), got {self.repetition_penalty}")
        if not self.do_sample:
            return  # the filters and the temperature do not apply
        _require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.top_k >= 0, f"top_k must be >= 0 (0 disables), got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1.0 disables), got {self.top_p}")
        _require(0.0 < self.typical_p <= 1.0,
                 f"typical_p must be in (0, 1] (1.0 disables), got {self.typical_p}")
        _require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1] (0 disables), got {self.min_p}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
