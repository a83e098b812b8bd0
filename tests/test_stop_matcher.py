"""Stop-sequence matching over text fed piece by piece, against a whole-text reference."""

from __future__ import annotations

import random

import pytest

from shardgen.router.stop import StopSequenceMatcher


def first_match_end(text: str, stops: list[str]) -> int | None:
    """Reference: where the earliest-ending occurrence of any stop ends in the whole text."""
    ends = [text.find(stop) + len(stop) for stop in stops if stop in text]
    return min(ends) if ends else None


def feed_all(stops: list[str], pieces: list[str]) -> tuple[int | None, int | None]:
    """(offset reported, index of the piece that reported it); stops feeding at a match."""
    matcher = StopSequenceMatcher(stops)
    for index, piece in enumerate(pieces):
        end = matcher.feed(piece)
        if end is not None:
            return end, index
    return None, None


def split_randomly(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_a_match_across_pieces() -> None:
    pieces = ["I love N", "ew", " Yo", "rk city"]
    assert feed_all(["New York"], pieces) == (len("I love New York"), 3)


def test_the_earliest_ending_match_wins_within_a_piece() -> None:
    # Both complete in the last piece; "cd" ends first even though "abc" is listed first.
    assert feed_all(["abcde", "cd"], ["ab", "cdef"]) == (4, 1)


def test_no_stops_and_empty_pieces() -> None:
    matcher = StopSequenceMatcher([])
    assert not matcher.active and matcher.feed("anything") is None
    matcher = StopSequenceMatcher(["x"])
    assert matcher.active and matcher.feed("") is None and matcher.feed("ax") == 2
    with pytest.raises(ValueError, match="empty"):
        StopSequenceMatcher(["ok", ""])


def test_offsets_count_every_piece_fed_so_far() -> None:
    matcher = StopSequenceMatcher(["stop"])
    for piece in ["a" * 100, "b" * 50, "xx st"]:
        assert matcher.feed(piece) is None
    assert matcher.feed("op!") == 150 + len("xx stop")


def test_a_match_is_reported_once() -> None:
    # The tail kept between pieces must not make an old match look new.
    matcher = StopSequenceMatcher(["aa", "zzzzzz"])
    assert matcher.feed("xa") is None
    assert matcher.feed("a") == 3
    assert matcher.feed("b") is None
    assert matcher.feed("aab") == 6


@pytest.mark.parametrize("seed", range(200))
def test_agrees_with_the_whole_text_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c.\n世"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
    stops = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.6:  # a substring of the text, so matches happen
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randint(1, 6)])
        else:
            stops.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
    pieces = split_randomly(text, rng)
    expected = first_match_end(text, stops)
    end, index = feed_all(stops, pieces)
    assert end == expected
    if expected is not None:
        # Reported by the piece that holds the match's last character.
        piece_ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
        assert index == next(i for i, e in enumerate(piece_ends) if e >= expected)
