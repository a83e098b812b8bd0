"""The prefill token budget of the next steps, shrunk after a shard ran out of memory.

A step that runs out of device memory fails its requests (the shards answer
RESOURCE_EXHAUSTED). Sending the same amount of work again would most likely fail again,
so the budget of prompt tokens per step is halved (down to a floor) each time that
happens; longer prompts are then computed in more, smaller chunks. Once steps succeed
again the budget grows back, doubling after every `recover_after` successful steps, up to
the configured --max-batch-prefill-tokens.
"""

from __future__ import annotations

# Successful steps between two doublings of a shrunk budget: long enough for the batch
# that caused the out-of-memory to have left, short enough (a second or so of decode
# steps) to give the throughput back soon.
DEFAULT_RECOVER_AFTER = 64


class PrefillBudget:
    """Prompt tokens the scheduler may put in one step (see the module docstring)."""

    def __init__(self, limit: int, *, floor: int, recover_after: int = DEFAULT_RECOVER_AFTER
                 ) -> None:
        if limit < 1 or floor < 1 or recover_after < 1:
            raise ValueError(f"limit, floor and recover_after must be at least 1, got "
                             f"{limit}, {floor} and {recover_after}")
        self.limit = limit
        self.floor = min(floor, limit)
        self.recover_after = recover_after
        self._current = limit
        self._successes = 0

    @property
    def current(self) -> int:
        """The budget of the next step, in prompt tokens."""
        return self._current

    @property
    def shrunk(self) -> bool:
        return self._current < self.limit

    def out_of_memory(self) -> int:
        """A step ran out of memory: halve the budget (not below the floor); the new one."""
        self._current = max(self.floor, self._current // 2)
        self._successes = 0
        return self._current

    def step_succeeded(self) -> None:
        """A step went through: after `recover_after` of them, double a shrunk budget."""
        if not self.shrunk:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self._current = min(self.limit, self._current * 2)
            self._successes = 0
