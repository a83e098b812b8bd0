"""How long the device ran each step and how long it sat idle before it, for the debug log.

CUDA events recorded around a step's kernels, in stream order: the time from the end of
the step queued before to this step's start is the device's idle time (the host was late
with this step), the time from start to end the step's own. Recorded only while debug
logging is on (timing events cost a few microseconds each) and only on CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class DeviceSpan:
    """The events of one step: its start and end, and the end of the step before it."""

    start: torch.cuda.Event
    before: torch.cuda.Event | None
    end: torch.cuda.Event | None = None

    def describe(self) -> str:
        """How long the device ran the step and idled before it, once the step's end has
        passed (a step whose results nobody waited for may still be running)."""
        if self.end is None or not self.end.query():
            return "device still running it"
        text = f"device ran {self.start.elapsed_time(self.end):.2f} ms"
        if self.before is not None and self.before.query():
            text += f", idle {max(0.0, self.before.elapsed_time(self.start)):.2f} ms before"
        return text


class StepTimeline:
    """Hands out a DeviceSpan per step launched, in launch order (one thread at a time),
    while `logger` logs debug lines."""

    def __init__(self, device: torch.device, logger: logging.Logger) -> None:
        self._cuda = device.type == "cuda"
        self._logger = logger
        self._last_end: torch.cuda.Event | None = None

    def begin(self) -> DeviceSpan | None:
        """Mark the start of a step's kernels (None when not timing)."""
        if not (self._cuda and self._logger.isEnabledFor(logging.DEBUG)):
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return DeviceSpan(start, self._last_end)

    def end(self, span: DeviceSpan | None) -> None:
        """Mark the end of the step's kernels (after its sampling)."""
        if span is None:
            return
        span.end = torch.cuda.Event(enable_timing=True)
        span.end.record()
        self._last_end = span.end
