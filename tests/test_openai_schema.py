"""OpenAI shapes: streamed text never shows a stop sequence, and adds up to the final text."""

from __future__ import annotations

import math
import random

import pytest

from shardgen.router.openai_schema import TextDeltas, final_text, finish_reason, logprob
from shardgen.router.requests import FinishReason


def reference_cut(text: str, stops: list[str]) -> tuple[str, int] | None:
    """(text before the stop, end of the stop) of the stop sequence that ends first."""
    ends = [(text.index(stop) + len(stop), -len(stop), stop) for stop in stops if stop in text]
    if not ends:
        return None
    end, _, stop = min(ends)
    return text[:end - len(stop)], end


def replay(pieces: list[str], stops: list[str]) -> tuple[list[str], str]:
    """Feed pieces as TextStream would (cut after a matched stop); returns (deltas, expected)."""
    deltas, sent = TextDeltas(stops), []
    text = ""
    for index, piece in enumerate(pieces):
        text += piece
        cut = reference_cut(text, stops)
        last = index == len(pieces) - 1
        if cut is not None:
            sent.append(deltas.next(text[:cut[1]], FinishReason.STOP_SEQUENCE))
            return sent, cut[0]
        sent.append(deltas.next(text, FinishReason.LENGTH if last else None))
    return sent, text


@pytest.mark.parametrize("seed", range(200))
def test_streamed_text_adds_up_and_never_shows_a_stop(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c"
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
              for _ in range(rng.randint(1, 12))]
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(0, 3))]
    sent, expected = replay(pieces, stops)
    assert "".join(sent) == expected
    shown = ""
    for delta in sent:
        shown += delta
        assert expected.startswith(shown)  # nothing sent is ever taken back


def test_text_that_may_start_a_stop_is_held_back_until_it_does_not() -> None:
    deltas = TextDeltas(["</end>"])
    assert deltas.next("Hello </", None) == "Hello "
    assert deltas.next("Hello </e", None) == ""
    assert deltas.next("Hello </em> x", None) == "</em> x"
    assert deltas.next("Hello </em> x", FinishReason.LENGTH) == ""


def test_final_text_drops_the_longest_stop_that_ends_the_text() -> None:
    assert final_text("say ab", FinishReason.STOP_SEQUENCE, ["b", "ab"]) == "say "
    assert final_text("say ab", FinishReason.LENGTH, ["ab"]) == "say ab"


def test_finish_reasons_and_logprobs_as_openai_writes_them() -> None:
    assert [finish_reason(r) for r in FinishReason] == ["length", "stop", "stop"]
    assert finish_reason(None) is None
    assert (logprob(-0.5), logprob(math.nan), logprob(-math.inf)) == (-0.5, None, -9999.0)
