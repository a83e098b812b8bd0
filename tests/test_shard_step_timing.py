"""The debug log's device timeline: how long a step ran and how long the device idled."""

from __future__ import annotations

import logging
import time

import torch

from shardgen.shard.step_timing import StepTimeline

from kernel_env import gpu_only

logger = logging.getLogger("test.step_timing")


def test_nothing_is_timed_on_cpu_or_without_debug_logging() -> None:
    logger.setLevel(logging.DEBUG)
    assert StepTimeline(torch.device("cpu"), logger).begin() is None
    logger.setLevel(logging.INFO)
    assert StepTimeline(torch.device("cuda"), logger).begin() is None   # makes no event


@gpu_only
def test_a_late_step_shows_the_device_idle_before_it() -> None:
    logger.setLevel(logging.DEBUG)
    timeline = StepTimeline(torch.device("cuda"), logger)
    x = torch.randn(4096, 4096, device="cuda")
    first = timeline.begin()
    for _ in range(20):
        x = x @ x / 64
    timeline.end(first)
    torch.cuda.synchronize()
    time.sleep(0.05)                      # the host is late with the next step
    second = timeline.begin()
    x = x @ x
    timeline.end(second)
    torch.cuda.synchronize()
    assert first is not None and second is not None
    assert first.describe().startswith("device ran ") and "idle" not in first.describe()
    idle = float(second.describe().split("idle ")[1].split(" ms")[0])
    assert idle >= 40.0
