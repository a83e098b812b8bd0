"""Test-only fault injection: chosen requests make a real shard's step fail.

Integration tests and the soak benchmark need a real shard process that raises during a
step, runs out of memory, or is slow, on demand. When the shard process starts with the
environment variable SHARDGEN_FAULT_INJECTION set, its entry point wraps the runner's
Prefill and Decode: a step in which a new request's input_ids contain a marker token
sequence raises that marker's fault before it computes anything. A step that fails changes
no state on the shard (the runner checks, computes, then commits), so for the router this
is the same as a fault halfway through the forward pass.

The value lists markers as `KIND=ID,ID,...` separated by `;`, for example
`error=403,407,261;oom=385,328`. Kinds:

- `error`: a RuntimeError, as a bug in the shard would raise (gRPC INTERNAL);
- `oom`: torch.OutOfMemoryError, as CUDA raises when a step does not fit (gRPC
  RESOURCE_EXHAUSTED);
- `slow`: no error; every step that carries the request, its Prefill and each Decode
  after, first sleeps SLOW_STEP_S, as a step of a large model on a GPU would take. Tests
  of deadlines use it so that a request's length in time does not hang on how fast the
  machine running the test is.

Never set it in production: it exists for tests, and the shard logs a warning naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
import time
from dataclasses import dataclass, field

import torch

from shardgen.proto import generate_pb2
from shardgen.shard.runner import ModelRunner

logger = logging.getLogger(__name__)

FAULT_INJECTION_ENV = "SHARDGEN_FAULT_INJECTION"
SLOW_STEP_S = 0.05


class InjectedFault(RuntimeError):
    """The `error` fault: an internal failure of the step."""


def _internal_error(message: str) -> Exception:
    return InjectedFault(message)


def _out_of_memory(message: str) -> Exception:
    return torch.OutOfMemoryError(f"CUDA out of memory (simulated): {message}")


_ERRORS: dict[str, Callable[[str], Exception]] = {
    "error": _internal_error,
    "oom": _out_of_memory,
}
SLOW = "slow"
_KINDS = (*_ERRORS, SLOW)


@dataclass(frozen=True)
class Fault:
    """Requests whose input_ids contain `marker` make their step raise `kind`'s error."""

    kind: str
    marker: tuple[int, ...]

    def matches(self, input_ids: Sequence[int]) -> bool:
        """Whether marker occurs in input_ids as a contiguous run."""
        ids, width = list(input_ids), len(self.marker)
        return any(tuple(ids[start:start + width]) == self.marker
                   for start in range(len(ids) - width + 1))


@dataclass(frozen=True)
class FaultInjection:
    """The markers a shard watches for (see the module docstring)."""

    faults: tuple[Fault, ...]
    # Requests a `slow` marker matched (kept for the shard's life: tests send a few).
    slow_ids: set[int] = field(default_factory=set, compare=False)

    @classmethod
    def parse(cls, spec: str) -> FaultInjection:
        """Parse `KIND=ID,ID,...;KIND=...`; ValueError names the entry that is wrong."""
        faults = []
        for entry in filter(None, (part.strip() for part in spec.split(";"))):
            kind, _, ids = entry.partition("=")
            if kind not in _KINDS:
                raise ValueError(f"{FAULT_INJECTION_ENV}: unknown fault kind {kind!r} in "
                                 f"{entry!r}; kinds: {', '.join(sorted(_KINDS))}")
            try:
                marker = tuple(int(token) for token in ids.split(","))
            except ValueError:
                raise ValueError(f"{FAULT_INJECTION_ENV}: {entry!r} must be KIND=ID,ID,... "
                                 f"with integer token ids") from None
            faults.append(Fault(kind, marker))
        if not faults:
            raise ValueError(f"{FAULT_INJECTION_ENV} is set but names no fault: {spec!r}")
        return cls(tuple(faults))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FaultInjection | None:
        """The injection the environment asks for, or None when the variable is unset."""
        spec = env.get(FAULT_INJECTION_ENV)
        return None if spec is None else cls.parse(spec)

    def check(self, request: generate_pb2.PrefillRequest) -> None:
        """Raise the fault of the first error marker found in the new requests' prompts;
        note the requests a slow marker matches."""
        for new in request.batch.requests:
            for fault in self.faults:
                if not fault.matches(new.input_ids):
                    continue
                if fault.kind == SLOW:
                    self.slow_ids.add(new.id)
                else:
                    raise _ERRORS[fault.kind](
                        f"fault injected by {FAULT_INJECTION_ENV} ({fault.kind}) for "
                        f"request {new.id}")

    def delay(self, request_ids: set[int]) -> None:
        """Sleep SLOW_STEP_S when the step carries a slow request."""
        if request_ids & self.slow_ids:
            time.sleep(SLOW_STEP_S)

    def install(self, runner: ModelRunner) -> None:
        """Check every Prefill and Decode of runner before it runs (replaces the bound
        methods)."""
        prefill, decode = runner.prefill, runner.decode

        def checked_prefill(request: generate_pb2.PrefillRequest) -> generate_pb2.PrefillResponse:
            self.check(request)
            self.delay({new.id for new in request.batch.requests}
                       | set(request.cached_batch.request_ids))
            return prefill(request)

        def checked_decode(request: generate_pb2.DecodeRequest) -> generate_pb2.DecodeResponse:
            carried = {rid for batch in request.batches for rid in batch.request_ids}
            self.delay(carried)
            return decode(request)

        runner.prefill = checked_prefill  # type: ignore[method-assign]
        runner.decode = checked_decode  # type: ignore[method-assign]
        logger.warning("TEST ONLY: fault injection is on (%s): %s", FAULT_INJECTION_ENV,
                       "; ".join(f"{f.kind} on {list(f.marker)}" for f in self.faults))
