"""Test doubles for the router's HTTP layer: an engine that plays scripted token ids.

`ScriptedEngine` stands in for shardgen.router.engine.Engine behind `create_app`: each
submitted request gets the events its script returns, optionally spaced in time, and the
engine records what was submitted and which handles were cancelled, so tests can check
both the HTTP answer and what the HTTP layer did to the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardgen.router.config import RouterConfig, resolve_limits
from shardgen.router.requests import (FinishReason, GenerationError, GenerationRequest,
                                      PrefillEvent, QueueFullError, TokenEvent)
from shardgen.router.server import ModelInfo

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

Event = PrefillEvent | TokenEvent | GenerationError
Script = Callable[[GenerationRequest], list[Event]]


def token_events(ids: list[int], finish: FinishReason = FinishReason.LENGTH,
                 logprob: float = -0.5) -> list[Event]:
    """TokenEvents for ids, the last one finishing with `finish`."""
    return [TokenEvent(id=token_id, logprob=logprob - 0.01 * i,
                       finish_reason=finish if i == len(ids) - 1 else None)
            for i, token_id in enumerate(ids)]


class ScriptedHandle:
    """A RequestHandle double: yields its script; a GenerationError in it is raised."""

    def __init__(self, request_id: int, events: list[Event], delay_s: float) -> None:
        self.id = request_id
        self._events = events
        self._delay_s = delay_s
        self.cancelled = False
        self.yielded = 0
        self._woken = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self._woken.set()

    async def __aiter__(self) -> AsyncIterator[PrefillEvent | TokenEvent]:
        for event in self._events:
            if self._delay_s:
                try:
                    await asyncio.wait_for(self._woken.wait(), self._delay_s)
                except asyncio.TimeoutError:
                    pass
            if self.cancelled:
                return
            if isinstance(event, GenerationError):
                raise event
            self.yielded += 1
            yield event


@dataclass
class ScriptedEngine:
    """Engine double: `script(request)` gives each request's events."""

    script: Script
    delay_s: float = 0.0
    max_requests: int | None = None
    submit_error: Exception | None = None
    submitted: list[GenerationRequest] = field(default_factory=list)
    handles: list[ScriptedHandle] = field(default_factory=list)

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        if self.submit_error is not None:
            raise self.submit_error
        if self.max_requests is not None and len(self.submitted) >= self.max_requests:
            raise QueueFullError(f"{len(self.submitted)} requests are in the engine already "
                                 f"(max_concurrent_requests={self.max_requests})")
        self.submitted.append(request)
        handle = ScriptedHandle(len(self.submitted), self.script(request), self.delay_s)
        self.handles.append(handle)
        return handle


def router_config(**overrides: object) -> RouterConfig:
    """A resolved RouterConfig for stories260K (max_position_embeddings 512)."""
    config = RouterConfig(model_id=str(STORIES), tokenizer=str(STORIES),
                          served_model_name="stories260K", **overrides)  # type: ignore[arg-type]
    return resolve_limits(config, max_position_embeddings=512, kv_capacity_tokens=4096)


MODEL_INFO = ModelInfo(model_id="stories260K", dtype="float32", device_type="cpu",
                       block_size=16, num_shard=1, max_position_embeddings=512,
                       version="test")
