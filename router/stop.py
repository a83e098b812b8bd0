"""Stop sequences: find the first one that the growing generated text completes.

The matcher sees the text piece by piece as tokens are detokenized. A stop sequence may
span many pieces, so it keeps the last `longest - 1` characters seen, which is the most of
an earlier piece that a match ending in the new piece can need; each call therefore costs
the length of the new piece plus that tail, never the whole text.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopSequenceMatcher:
    """Finds where the first stop sequence ends in text fed to it piece by piece."""

    def __init__(self, stop_sequences: Iterable[str]) -> None:
        self._stops = tuple(stop_sequences)
        if any(not stop for stop in self._stops):
            raise ValueError(f"stop sequences must not be empty, got {self._stops!r}")
        self._keep = max((len(stop) for stop in self._stops), default=1) - 1
        self._tail = ""
        self._consumed = 0  # characters fed before the tail starts

    @property
    def active(self) -> bool:
        """False when there is nothing to match (then `feed` always answers None)."""
        return bool(self._stops)

    def feed(self, piece: str) -> int | None:
        """Append a piece of text; return where the first completed match ends, else None.

        The answer is an offset into the whole text fed so far (every piece since the
        start), just past the stop sequence's last character. Of matches completed by the
        same piece, the one ending first wins. A match is reported once: feeding on after
        it reports only matches that end later.
        """
        if not self._stops or not piece:
            return None
        window = self._tail + piece
        end = self._first_match_end(window, len(self._tail))
        start_of_window = self._consumed
        kept = window[-self._keep:] if self._keep else ""
        self._consumed += len(window) - len(kept)
        self._tail = kept
        return None if end is None else start_of_window + end

    def _first_match_end(self, window: str, new_from: int) -> int | None:
        """End offset in window of the earliest match that uses a character past new_from.

        Matches that lie wholly in the tail ended in an earlier piece and were reported
        (or could not exist) then.
        """
        best: int | None = None
        for stop in self._stops:
            index = window.find(stop, max(0, new_from - len(stop) + 1))
            if index >= 0:
                end = index + len(stop)
                best = end if best is None else min(best, end)
        return best
