"""Per-request metrics that only the HTTP layer can see: arrival to first and last token.

The engine records what happens per step (batch sizes, step times, preemptions); a
`RequestTimer` records, for one HTTP request, the prompt size, the time to the first token,
the gaps between tokens, the whole duration and the tokens generated, and logs one line
per completed request (inside the request's span: JSON logs carry its trace id). With no
Metrics object every method is a no-op, so handlers call it unconditionally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shardgen.router.metrics import Metrics

logger = logging.getLogger(__name__)


class RequestTimer:
    """Times one request from its arrival (the timer's creation)."""

    def __init__(self, metrics: Metrics | None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._metrics = metrics
        self._clock = clock
        self._arrival = clock()
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._validated: float | None = None
        self._input_tokens = 0

    def admitted(self, input_tokens: int) -> None:
        """The request passed validation (and tokenization) with this many prompt tokens."""
        if self._metrics is not None:
            self._validated = self._clock()
            self._metrics.validation_duration.observe(self._validated - self._arrival)
            self._input_tokens = input_tokens
            self._metrics.input_tokens.observe(input_tokens)
            self._metrics.prompt_tokens.inc(input_tokens)

    def token(self) -> None:
        """A generated token reached the handler."""
        if self._metrics is None:
            return
        now = self._clock()
        if self._last_token is None:
            self._first_token = now
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_token)
        self._last_token = now
        self._metrics.generated_tokens_total.inc()

    def finished(self, generated_tokens: int) -> None:
        """The request completed (any finish reason) after generated_tokens tokens."""
        if self._metrics is None:
            return
        duration = self._clock() - self._arrival
        self._metrics.request_duration.observe(duration)
        self._metrics.generated_tokens.observe(generated_tokens)
        first = self._first_token - self._arrival if self._first_token is not None else duration
        validated = self._validated - self._arrival if self._validated is not None else 0.0
        logger.info("request done in %.3f s: %d prompt tokens, %d generated, validated after "
                    "%.3f s, first token after %.3f s", duration, self._input_tokens,
                    generated_tokens, validated, first)


def count_outcome(metrics: Metrics | None, outcome: str) -> None:
    """Count a finished generation request: "success", or the error_type it got."""
    if metrics is not None:
        metrics.requests.labels(outcome).inc()
