"""The continuous-batching policy: which requests compute what in the next step.

Pure bookkeeping, no I/O: the `Scheduler` holds every request's progress (`Sequence`), asks
the block manager for KV blocks, and answers `schedule()` with a `StepPlan` that the engine
turns into one Prefill or Decode call. The engine reports the step's outcome back through
`complete()` (or `abort_step()` when the shards failed it).

Every request has a token count (prompt plus tokens generated so far) and a computed count
(tokens whose KV the shards have written). There are no separate prefill and decode modes:

- waiting     holds no blocks; admitted within the step's prefill token budget, shortest
              prompt first (tokens left after its cached prefix; `_admission_order`) or in
              FIFO order, except that one sharing prompt blocks with a prompt in flight
              waits for them to be committed (prefix caching), while others may start.
- prefilling  holds blocks for its whole sequence; its prompt is computed in chunks, one per
              step, while the running requests keep decoding in the same step.
- running     lives in the shards' cached batch; computes one token per step.

When KV blocks run out while the running requests grow, the newest holders are preempted: they
give their blocks back and return to the front of the queue, to be recomputed later from their
prompt plus what they generated.

When a step runs out of device memory, the engine tells `out_of_memory()`: the prompt tokens
of the next steps are cut (halved, then grown back as steps succeed; see prefill_budget.py).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from .prefill_budget import PrefillBudget
from .radix import block_hashes

if TYPE_CHECKING:
    from .block_manager import BlockManager

# Waiting requests one step passes over while they wait for a prefix in flight (see
# Scheduler._admit): each costs a scan of the prompts in flight, and without a bound a long
# queue of one group's requests would be scanned whole at every step. The requests behind
# the last one passed over wait for a later step, as behind a request that does not fit.
MAX_DEFERRED_PER_STEP = 64
# Waiting requests, from the front of the queue, that the shortest-prefill policy orders
# (each costs a probe of its cached prefix per admitting step); the rest wait in FIFO order.
ADMISSION_WINDOW = 64

SCHEDULING_POLICIES = ("shortest-prefill", "fcfs")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits, parsed once at the router's entry point.

    max_concurrent_requests: requests in the engine (queued or running); more are refused.
    max_batch_prefill_tokens: prompt tokens computed in one step; longer prompts are chunked.
    max_batch_total_tokens: prompt + max_new_tokens summed over the requests of the batch;
        None leaves the bound to the KV blocks alone.
    max_batch_size: requests in one step; None = no limit but the others.
    waiting_served_ratio, max_waiting_tokens: as in TGI, while a batch runs, new requests
        join only when at least floor(running * waiting_served_ratio) of them can start at
        once, or when none has joined for max_waiting_tokens steps. The default ratio 0 lets
        them join at the next step: their prompts ride in one mixed step with the running
        batch's decode, which goes on (TGI's ratio batches prefills that would pause it).
        With 0.3, 256 requests of 1024 tokens arriving at once were held back: the last one
        started at step 565 of 820 (H100: its first token came after 14.7 s).
    enable_prefix_caching: reuse the KV of prompt prefixes already computed (the block
        manager does it, and the scheduler asks it whether it is on; this is where the
        router's entry point reads the setting from). A request sharing a prefix with a
        prompt in flight then waits for its blocks instead of computing them again.
    scheduling_policy: the order in which waiting requests start. "shortest-prefill"
        (default): fewest prompt tokens left to compute first (after the cached prefix;
        the shortest-job-first order, which lowers the mean time to first token when the
        prompts waiting outnumber the budget: cached questions go before long prompts;
        every step is still filled to its budget); a request passed over for
        max_waiting_tokens steps, or preempted, goes first regardless, so none starves.
        "fcfs": arrival order, as TGI and vLLM do.
    admit_ahead: plan each step's prompt chunks one step early, with the step before (the
        shards compute them in the step they run ahead: RunAhead in generate.proto). On when
        the shards run ahead (Info's runs_ahead). The next step then starts no other request:
        one arriving meanwhile starts a step later, but the device never waits for the
        router to plan the prompts of a step nor for the shard to lay them out.
    """

    max_concurrent_requests: int = 128
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    enable_prefix_caching: bool = True
    scheduling_policy: str = "shortest-prefill"
    admit_ahead: bool = False

    def __post_init__(self) -> None:
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        for name in ("max_concurrent_requests", "max_batch_prefill_tokens", "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_batch_total_tokens", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}")
        if self.waiting_served_ratio < 0:
            raise ValueError(f"waiting_served_ratio must be >= 0, got {self.waiting_served_ratio}")


class SeqStatus(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"


@dataclass(eq=False)
class Sequence:
    """One request's progress as the scheduler sees it."""

    request_id: int
    # The prompt, then every token generated so far; grows by one per step while running.
    token_ids: list[int]
    prompt_len: int
    max_new_tokens: int
    priority: int = 0
    # Leading prompt tokens the priority covers (None: the whole prompt).
    priority_tokens: int | None = None
    deadline: float | None = None
    prefill_logprobs: bool = False
    status: SeqStatus = SeqStatus.WAITING
    # The whole block table while the request holds blocks (prefilling or running).
    blocks: list[int] = field(default_factory=list)
    # Leading tokens whose KV the shards have written.
    num_computed: int = 0
    # Free blocks when admission last failed for want of blocks; None after it succeeds.
    blocked_at_free: int | None = None
    # Fault isolation (Scheduler.abort_step): steps that failed with it among the suspects
    # without showing which one was at fault, the last of them numbered in `incident`
    # (0: none); on trial, its prompt is computed in a step with no other prompt, and it
    # alone is blamed when that step fails.
    shared_failures: int = 0
    incident: int = 0
    on_trial: bool = False
    # Admitting steps that started a request queued behind this one (shortest-prefill).
    passed_over: int = 0
    # radix.block_hashes of the prompt's reusable blocks, computed once when first ordered.
    prompt_hashes: list[str] | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def wants_prefill_logprobs(self) -> bool:
        """Prompt logprobs go out once; a request recomputed after preemption already sent them."""
        return self.prefill_logprobs and self.num_generated == 0


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + length) of a sequence, computed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def is_last(self) -> bool:
        """The chunk reaches the end of the sequence: the shard samples a token."""
        return self.start + self.length == len(self.seq.token_ids)


@dataclass
class StepPlan:
    """What the next step computes; the engine sends it as one Prefill or Decode.

    batch_changed: running requests left since the last step (cancelled, preempted,
        expired): the shards' cached batch must be filtered down to `decoding` first.
    decoding: the running requests, in the shards' batch order; each computes one token.
    extensions: new blocks of running requests, keyed by request id.
    chunks: prompts (or chunks of them) computed in this step.
    preempted: requests sent back to the queue in this step.
    failed: requests removed with a reason (deadline passed, cannot fit the KV cache).
    next_chunks: with admit_ahead, the prompt chunks of the step after this one, planned
        now: the next schedule() plans exactly these unless requests leave meanwhile.
    pending_rows: in a plan of the step after next, the requests that the step before it
        turns from prefilling to running (they decode in it).
    """

    batch_changed: bool = False
    decoding: list[Sequence] = field(default_factory=list)
    extensions: dict[int, list[int]] = field(default_factory=dict)
    chunks: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    next_chunks: list[PrefillChunk] = field(default_factory=list)
    pending_rows: int = 0

    @property
    def is_empty(self) -> bool:
        """Nothing to send to the shards (a filter alone is sent with the next step)."""
        return not self.chunks and not self.decoding


class BatchMismatchError(Exception):
    """The shards' batch after a step disagrees with what the scheduler expects."""


def slot_range(blocks: list[int], block_size: int, start: int, end: int) -> list[int]:
    """KV slots of positions [start, end) of a request with this block table."""
    first, last = start // block_size, math.ceil(end / block_size)
    if last > len(blocks):
        raise ValueError(f"positions up to {end} need {last} blocks, the table has {len(blocks)}")
    table = np.asarray(blocks[first:last], dtype=np.int64)
    slots = (table[:, None] * block_size + np.arange(block_size, dtype=np.int64)).ravel()
    offset = first * block_size
    return slots[start - offset:end - offset].tolist()


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def common_blocks(a: list[int], b: list[int], limit: int, block_size: int) -> int:
    """Tokens of the common prefix of `a` and `b` in whole blocks, at most `limit` (a
    multiple of block_size that neither list is shorter than)."""
    length = 0
    while length < limit and a[length:length + block_size] == b[length:length + block_size]:
        length += block_size
    return length


class Scheduler:
    """Owns the queue, the running set and their blocks; decides every step.

    Not thread-safe and not re-entrant: the engine calls it from its batching loop only
    (`add` may come from request handlers on the same event loop, between steps).
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self._config = config
        self._blocks = blocks
        self._block_size = blocks.block_size
        # Block 0 is reserved (padding, health probes); num_blocks counts it.
        self._capacity_blocks = blocks.num_blocks - 1
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        self._batch_changed = False
        # Numbers the failed steps whose suspects went on trial (Sequence.incident).
        self._incidents = itertools.count(1)
        # Steps since a new request last joined (TGI's waiting_tokens).
        self._steps_since_admission = 0
        # The last plan's next_chunks are the prompts of the next step (admit_ahead).
        self._planned_ahead = False
        # No smaller than a block: a prompt chunked finer would gain little memory.
        self._prefill_budget = PrefillBudget(config.max_batch_prefill_tokens,
                                             floor=self._block_size)

    # ------------------------------------------------------------------ queries

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens the next step may compute (cut after an out-of-memory step)."""
        return self._prefill_budget.current

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Requests that hold blocks: prefilling or running."""
        return len(self._prefilling) + len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._by_id)

    @property
    def running_ids(self) -> list[int]:
        return [seq.request_id for seq in self._running]

    def get(self, request_id: int) -> Sequence | None:
        return self._by_id.get(request_id)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError for a request that could never be scheduled."""
        if prompt_len < 1:
            raise ValueError("a request needs at least one input token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        needed = blocks_for(prompt_len, self._block_size)
        if needed > self._capacity_blocks:
            raise ValueError(
                f"the prompt has {prompt_len} tokens and needs {needed} KV blocks of "
                f"{self._block_size} tokens; the whole KV cache has {self._capacity_blocks} "
                f"blocks ({self._capacity_blocks * self._block_size} tokens)")
        limit = self._config.max_batch_total_tokens
        if limit is not None and prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_batch_total_tokens ({limit})")

    # ------------------------------------------------------------------ mutations

    def add(self, seq: Sequence) -> None:
        """Queue a new request at the back."""
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id} is already scheduled")
        seq.status = SeqStatus.WAITING
        self._by_id[seq.request_id] = seq
        self._waiting.append(seq)

    def remove(self, request_id: int) -> Sequence | None:
        """Take a request out wherever it is and free its blocks; None if unknown."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        else:
            self._release(seq)
        return seq

    def remove_all(self) -> list[Sequence]:
        """Forget every request and free every block (shutdown); the shards' batch is gone."""
        seqs = list(self._by_id.values())
        for seq in seqs:
            self.remove(seq.request_id)
        self._batch_changed = False
        return seqs

    def schedule(self, now: float) -> StepPlan:
        """Decide the next step: expire, grow the running requests (preempting), admit."""
        plan = StepPlan()
        self._steps_since_admission += 1
        self._expire(now, plan)
        self._grow_running(plan)
        self._continue_prefills(plan)
        planned_ahead, self._planned_ahead = self._planned_ahead, False
        if not plan.preempted and not planned_ahead:
            # After a preemption blocks are short: admitting now would only thrash. A step
            # planned ahead computes what the last plan said (the shards may be at it).
            self._admit(plan)
        plan.decoding = list(self._running)
        plan.batch_changed = self._batch_changed
        self._batch_changed = False
        if self._config.admit_ahead and not plan.preempted and not plan.is_empty:
            plan.next_chunks = self._plan_next_chunks(plan)
            self._planned_ahead = bool(plan.next_chunks)
        return plan

    def complete(self, plan: StepPlan, tokens: Mapping[int, list[int]],
                 finished: Collection[int], batch_ids: list[int]) -> list[Sequence]:
        """Record a step's outcome; return the requests that finished (now forgotten).

        tokens: the ids sampled per request; finished: requests the shard stopped (they left
        its batch); batch_ids: the shards' cached batch after the step, in its order.
        Raises BatchMismatchError, changing nothing, when the outcome is not the one the plan
        calls for; the engine then aborts the step.
        """
        last_chunks = [chunk for chunk in plan.chunks if chunk.is_last]
        sampled = [seq.request_id for seq in plan.decoding] + [c.seq.request_id for c in last_chunks]
        self._check_outcome(sampled, tokens, finished, batch_ids)
        for seq in plan.decoding:
            computed = len(seq.token_ids)
            self._mark_computed(seq, computed, commit=computed % self._block_size == 0)
        for chunk in plan.chunks:
            self._mark_computed(chunk.seq, chunk.start + chunk.length, commit=True)
        for chunk in last_chunks:
            self._prefilling.remove(chunk.seq)
            chunk.seq.on_trial = False   # its prompt went through a step of its own
        for request_id, ids in tokens.items():
            self._by_id[request_id].token_ids.extend(ids)
        self._running = [self._by_id[request_id] for request_id in batch_ids]
        for seq in self._running:
            seq.status = SeqStatus.RUNNING
        done = [self._by_id.pop(request_id) for request_id in finished]
        for seq in done:
            # Already out of both lists: the shards dropped it from their batch.
            self._blocks.free(seq.request_id)
        self._prefill_budget.step_succeeded()
        return done

    @staticmethod
    def _check_outcome(sampled: list[int], tokens: Mapping[int, list[int]],
                       finished: Collection[int], batch_ids: list[int]) -> None:
        expected = set(sampled)
        if set(tokens) != expected or not all(tokens.values()):
            raise BatchMismatchError(
                f"the shards sampled tokens for {sorted(tokens)}, expected {sorted(expected)}")
        if not expected.issuperset(finished):
            raise BatchMismatchError(
                f"the shards finished {sorted(finished)}, not all of them sampled this step")
        still_running = expected - set(finished)
        if set(batch_ids) != still_running or len(batch_ids) != len(still_running):
            raise BatchMismatchError(
                f"the shards' batch holds {sorted(batch_ids)}, expected {sorted(still_running)}")

    def decodes_only_next(self, plan: StepPlan) -> bool:
        """Whether the step after `plan` is likely the plain decode of the batch `plan`
        leaves: no prompt chunk is left, and the next schedule() would start no waiting
        request. The engine then asks the shards to run that step ahead (RunAhead in
        generate.proto); a wrong guess costs one discarded step on the device."""
        finishing = {id(chunk.seq) for chunk in plan.chunks if chunk.is_last}
        if any(id(seq) not in finishing for seq in self._prefilling):
            return False
        if not self._waiting:
            return True
        # _count_startable does not know that a request may wait for a prefix in flight
        # (_admit), and need not: it waits only while a prompt is being computed, so either
        # one is left after this plan (answered above) or the next step starts its provider.
        head = self._waiting[0]
        if head.blocked_at_free is not None and self._blocks.num_free_blocks <= head.blocked_at_free:
            return True   # no block came free for it: schedule() will not start it
        wanted = self._min_new_requests(len(plan.decoding) + len(finishing), self._steps_since_admission + 1)
        return self._count_startable(self._prefill_budget.current, plan, wanted) < wanted

    def out_of_memory(self) -> int:
        """A step ran out of device memory: cut the prefill budget; returns the new one."""
        return self._prefill_budget.out_of_memory()

    def abort_step(self, plan: StepPlan, *, isolate: bool) -> tuple[list[Sequence], list[Sequence]]:
        """The shards failed the step; returns (requests that fail, requests requeued).

        The engine clears the shards' cache, so nothing of the running batch survives.
        Without isolate (the shards could not answer: dead, hung) every request of the step
        fails. With it, one request's fault does not take the others down. The step's
        request on trial is blamed if there is one, or the step's only request. Else the
        suspects are the prompts of the step (the running requests came through the step
        before), or everyone in a step without prompts: a suspect that shared a failed step
        before is blamed, the others go on trial. Everyone not blamed goes back to the front
        of the queue, to be recomputed as after a preemption. A request blamed on trial or
        alone explains the failed step it was a suspect of: the other suspects of that step
        lose the strike it gave them (those not yet tried keep their trial).
        """
        running = list(self._running)
        prompts = [chunk.seq for chunk in plan.chunks if chunk.seq.request_id in self._by_id]
        seqs = running + prompts
        on_trial = [seq for seq in seqs if seq.on_trial]
        if not isolate:
            blamed = seqs
        elif on_trial or len(seqs) == 1:
            blamed = on_trial or seqs
            self._clear_strikes({seq.incident for seq in blamed} - {0})
        else:
            suspects = prompts or running
            blamed = [seq for seq in suspects if seq.shared_failures > 0]
            incident = next(self._incidents)
            for seq in suspects:
                seq.shared_failures += 1
                seq.incident = incident
                seq.on_trial = True
        requeued = [seq for seq in seqs if seq not in blamed]
        for seq in blamed:
            self.remove(seq.request_id)
        for seq in reversed(requeued):
            self._release(seq)
            self._requeue(seq)
        self._batch_changed = False
        self._planned_ahead = False   # the shards' step ahead is gone with their cache
        return blamed, requeued

    def _clear_strikes(self, incidents: set[int]) -> None:
        """The failed steps numbered `incidents` are explained: their suspects lose the
        strike they took there (a live request holds one strike at most: the second one
        fails it)."""
        for seq in self._by_id.values():
            if seq.incident in incidents:
                seq.shared_failures -= 1
                seq.incident = 0

    # ------------------------------------------------------------------ steps of schedule()

    def _expire(self, now: float, plan: StepPlan) -> None:
        for seq in list(self._by_id.values()):
            if seq.deadline is not None and now >= seq.deadline:
                self.remove(seq.request_id)
                plan.failed.append((seq, f"request {seq.request_id} passed its deadline "
                                         f"after {seq.num_generated} generated tokens"))

    def _grow_running(self, plan: StepPlan) -> None:
        """Give every running request a block for the token it computes next, then, while
        blocks are free, for the token after it (RunAhead in generate.proto: the shards may
        compute that one before the next call).

        Oldest first; when blocks run out the newest holder is preempted, which may be the
        request itself. A request that alone cannot grow can never finish: it fails. Blocks
        for the token after next are never worth a preemption: without them, the shards
        only wait for the next call.
        """
        growing = [seq for seq in self._running
                   if len(seq.blocks) * self._block_size < len(seq.token_ids)]
        for seq in sorted(growing, key=lambda s: s.request_id):
            # Until it has its block, or leaves (preempted as the newest holder, or failed).
            while seq.status is SeqStatus.RUNNING:
                needed = len(seq.token_ids)
                allocation = self._blocks.allocate(seq.request_id, seq.token_ids, needed)
                if allocation is not None:
                    seq.blocks = list(allocation.blocks)
                    plan.extensions[seq.request_id] = list(allocation.new_blocks)
                    break
                if self.num_active == 1:
                    self.remove(seq.request_id)
                    plan.failed.append((seq, self._too_long_message(seq, needed)))
                    break
                victim = max(self._prefilling + self._running, key=lambda s: s.request_id)
                self._preempt(victim, plan)
        for seq in self._running:
            ahead = self._tokens_ahead(seq)
            if len(seq.blocks) * self._block_size >= ahead:
                continue
            allocation = self._blocks.allocate(seq.request_id, seq.token_ids, ahead)
            if allocation is None:
                break
            seq.blocks = list(allocation.blocks)
            plan.extensions.setdefault(seq.request_id, []).extend(allocation.new_blocks)

    @staticmethod
    def _tokens_ahead(seq: Sequence) -> int:
        """Positions a request's blocks cover to hold the token after the one it computes
        next; its last token is never computed (nothing follows it)."""
        return max(len(seq.token_ids), min(len(seq.token_ids) + 1, seq.prompt_len + seq.max_new_tokens - 1))

    def _too_long_message(self, seq: Sequence, needed_tokens: int) -> str:
        return (f"request {seq.request_id} needs {blocks_for(needed_tokens, self._block_size)} "
                f"KV blocks for {needed_tokens} tokens; the whole KV cache has "
                f"{self._capacity_blocks} blocks of {self._block_size} tokens")

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self._release(seq)
        plan.extensions.pop(seq.request_id, None)
        self._requeue(seq)
        plan.preempted.append(seq)

    def _continue_prefills(self, plan: StepPlan, after: StepPlan | None = None) -> None:
        """The next chunk of every prompt being computed, within the budgets; with `after`,
        of the prompts as that step leaves them (its last chunks gone to running)."""
        finishing = {id(c.seq) for c in after.chunks if c.is_last} if after is not None else set()
        computed = {id(c.seq): c.start + c.length for c in after.chunks} if after is not None else {}
        budget = self._prefill_budget.current
        for seq in self._prefilling:
            if id(seq) in finishing:
                continue
            if budget == 0 or not self._has_room(plan):
                return
            start = computed.get(id(seq), seq.num_computed)
            length = min(len(seq.token_ids) - start, budget)
            plan.chunks.append(PrefillChunk(seq, start, length))
            budget -= length

    def _plan_next_chunks(self, plan: StepPlan) -> list[PrefillChunk]:
        """The prompt chunks of the step after `plan` (admit_ahead): what _continue_prefills
        will plan once `plan` completes, then requests admitted now to fill its budget.

        None on trial (a trial's step is planned on its own), nor when a waiting request would
        wait for a prefix in flight (admitted a step later, it reuses it). The room counted
        for the next step assumes that nothing `plan` samples stops; if some does, the next
        step has room for a request more than planned, which it leaves unused.
        """
        if any(seq.on_trial for seq in self._prefilling) or (
                self._waiting and self._waiting[0].on_trial):
            return []
        ahead = StepPlan(pending_rows=sum(chunk.is_last for chunk in plan.chunks))
        self._continue_prefills(ahead, after=plan)
        budget = self._prefill_budget.current - sum(chunk.length for chunk in ahead.chunks)
        order = self._admission_order() if self._waiting and budget > 0 else []
        if self._prefix_waits_within(order, budget):
            # Planned now, it would start a step later than it can (its provider commits
            # first): leave the next step to be planned after this one, as without admit_ahead.
            return []
        self._admit(ahead, order)
        return ahead.chunks

    def _prefix_waits_within(self, order: list[Sequence], budget: int) -> bool:
        """Whether a waiting request that admission (in `order`) would reach within `budget`
        prompt tokens waits for a prefix in flight (_waits_for_prefix)."""
        for seq in order:
            if budget <= 0:
                break
            if self._waits_for_prefix(seq):
                return True
            budget -= len(seq.token_ids)
        return False

    def _admit(self, plan: StepPlan, order: list[Sequence] | None = None) -> None:
        """Start waiting requests in the policy's order while budgets and blocks allow.

        A request that would compute prompt blocks a prompt in flight is about to commit
        (`_waits_for_prefix`) is passed over: it keeps its place in the queue and reuses
        them in a later step; the requests after it may start now. The first request that
        does not fit ends the step's admissions. `order`: _admission_order() if the caller
        has it already.
        """
        budget = self._prefill_budget.current - sum(c.length for c in plan.chunks)
        if not self._waiting or budget <= 0 or any(seq.on_trial for seq in self._prefilling):
            return
        if self._waiting[0].on_trial:
            self._start_trial(plan, budget)
            return
        wanted = self._min_new_requests(len(self._running), self._steps_since_admission)
        if self._count_startable(budget, plan, wanted) < wanted:
            return
        reserved = self._reserved_tokens()
        started: list[PrefillChunk] = []
        deferred = 0
        for seq in order or self._admission_order():
            if budget <= 0 or not self._has_room(plan) or seq.on_trial:
                break   # one on trial starts in a step of its own
            limit = self._config.max_batch_total_tokens
            if limit is not None and reserved + seq.prompt_len + seq.max_new_tokens > limit:
                break
            if self._waits_for_prefix(seq):
                deferred += 1
                if deferred == MAX_DEFERRED_PER_STEP:
                    break
                continue
            chunk = self._start(seq, budget)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            started.append(chunk)
            budget -= chunk.length
            reserved += seq.prompt_len + seq.max_new_tokens
        # Deferred requests count as joining: they start once their prefix is committed
        # (unstarting its provider would only delay them). Short of `wanted` otherwise,
        # blocks, not budgets, held the batch back: keep the queue as it was.
        if started and len(started) + deferred < wanted:
            for chunk in reversed(started):
                self._unstart(chunk.seq, plan)
            started = []
        if started:
            self._steps_since_admission = 0
            self._leave_queue({id(chunk.seq) for chunk in started})

    def _admission_order(self) -> list[Sequence]:
        """The waiting requests in the order `_admit` considers them.

        fcfs: the queue's order. shortest-prefill: of the first ADMISSION_WINDOW requests,
        those that go first (preempted ones, those on trial after a failed step, and those
        passed over for max_waiting_tokens admitting steps) in queue order, then the others
        by tokens left after the prefix the cache holds for them (an estimate from the
        prompt's block hashes), ties in queue order; then the rest of the queue in order."""
        if self._config.scheduling_policy == "fcfs":
            return list(self._waiting)
        patience = self._config.max_waiting_tokens
        ranked = []   # (group: 0 goes first, tokens left, queue position, request)
        for position, seq in enumerate(itertools.islice(self._waiting, ADMISSION_WINDOW)):
            if seq.num_generated > 0 or seq.on_trial or seq.passed_over >= patience:
                ranked.append((0, 0, position, seq))
            else:
                ranked.append((1, len(seq.token_ids) - self._cached_estimate(seq), position, seq))
        ranked.sort(key=lambda entry: entry[:3])
        return [seq for *_, seq in ranked] + list(itertools.islice(self._waiting, ADMISSION_WINDOW, None))

    def _cached_estimate(self, seq: Sequence) -> int:
        """Prompt tokens the prefix cache holds for waiting `seq`, as far as its blocks'
        hashes tell (no tokens compared: for ordering only)."""
        if not self._blocks.enable_prefix_caching or seq.wants_prefill_logprobs:
            return 0
        if seq.prompt_hashes is None:
            # The blocks `lookup` could give it: the last prompt token is always computed.
            reusable = (len(seq.token_ids) - 1) // self._block_size
            seq.prompt_hashes = block_hashes(seq.token_ids, self._block_size, reusable)
        return self._blocks.indexed_prefix_tokens(seq.prompt_hashes)

    def _leave_queue(self, started: set[int]) -> None:
        """Take the started requests out of the queue; those still waiting ahead of the last
        one started were passed over once more."""
        last = max(i for i, seq in enumerate(self._waiting) if id(seq) in started)
        for seq in itertools.islice(self._waiting, last):
            if id(seq) not in started:
                seq.passed_over += 1
        self._waiting = deque(seq for seq in self._waiting if id(seq) not in started)

    def _waits_for_prefix(self, seq: Sequence) -> bool:
        """Whether waiting `seq` shares more whole prompt blocks with a prompt being
        computed (its provider) than the prefix cache holds for it now.

        The provider commits them as its chunks complete; `seq` then reuses them instead of
        computing them beside it. Not when a side computes its prompt into blocks of its own
        (prompt logprobs: nothing of it is indexed, nor reused), and not with prefix caching
        off. The wait ends when the provider leaves the prefilling list (prompt done,
        preempted, removed), so it never outlasts the provider's prompt.
        """
        if (not self._prefilling or not self._blocks.enable_prefix_caching
                or seq.wants_prefill_logprobs):
            return False
        size = self._block_size
        # The blocks `lookup` could give it: the last prompt token is always computed.
        reusable = (seq.prompt_len - 1) // size * size
        if reusable == 0:
            return False
        first_block = seq.token_ids[:size]
        shared = 0
        for other in self._prefilling:
            # The first block, cheaply, before comparing prompts: most are unrelated.
            if other.wants_prefill_logprobs or other.token_ids[:size] != first_block:
                continue
            limit = min(reusable, other.prompt_len // size * size)
            shared = max(shared, common_blocks(seq.token_ids, other.token_ids, limit, size))
            if shared == reusable:
                break
        return shared > 0 and shared > self._blocks.lookup(seq.token_ids)

    def _start_trial(self, plan: StepPlan, budget: int) -> None:
        """Start the request on trial at the head of the queue, alone among prompts: once
        no other prompt is being computed, beside the running requests only."""
        if plan.chunks or not self._has_room(plan):
            return
        chunk = self._start(self._waiting[0], budget)
        if chunk is not None:
            self._waiting.popleft()
            plan.chunks.append(chunk)
            self._steps_since_admission = 0

    def _min_new_requests(self, running: int, steps_since_admission: int) -> int:
        if not running or steps_since_admission >= self._config.max_waiting_tokens:
            return 1
        return max(1, math.floor(running * self._config.waiting_served_ratio))

    def _count_startable(self, budget: int, plan: StepPlan, wanted: int) -> int:
        """How many waiting requests the token and size budgets alone let start (cheap)."""
        room = self._room(plan)
        count = 0
        for seq in self._waiting:
            if count >= wanted or budget <= 0 or count >= room:
                break
            count += 1
            budget -= len(seq.token_ids)
        return count

    def _start(self, seq: Sequence, budget: int) -> PrefillChunk | None:
        """Allocate blocks for the whole sequence and plan its first chunk; None if full.

        Blocks for the whole prompt, not only the first chunk: the contract gives a slot for
        every position to the end of input_ids in each chunk's request; and, when they fit,
        for the token the prompt samples.
        """
        free = self._blocks.num_free_blocks
        if seq.blocked_at_free is not None and free <= seq.blocked_at_free:
            # It did not fit and no block came free since: matching its prompt against the
            # prefix index again would cost O(prompt) every step for the same answer.
            return None
        allocation = None
        # The slot of the token it samples too, for a step run ahead; the prompt alone if
        # only that fits.
        for tokens in dict.fromkeys((self._tokens_ahead(seq), len(seq.token_ids))):
            # Prompt logprobs need every prompt token computed: into blocks of its own, not
            # over cached ones that other requests read.
            allocation = self._blocks.allocate(seq.request_id, seq.token_ids, tokens,
                                               priority=seq.priority,
                                               priority_tokens=seq.priority_tokens,
                                               reuse=not seq.wants_prefill_logprobs)
            if allocation is not None:
                break
        if allocation is None:
            seq.blocked_at_free = free
            return None
        seq.blocked_at_free = None
        seq.blocks = list(allocation.blocks)
        seq.num_computed = allocation.num_cached_tokens
        seq.status = SeqStatus.PREFILLING
        self._prefilling.append(seq)
        length = min(len(seq.token_ids) - seq.num_computed, budget)
        return PrefillChunk(seq, seq.num_computed, length)

    def _unstart(self, seq: Sequence, plan: StepPlan) -> None:
        """Undo `_start` in this step's plan; the caller puts it back in the queue."""
        self._release(seq)
        plan.chunks = [chunk for chunk in plan.chunks if chunk.seq is not seq]
        seq.status = SeqStatus.WAITING

    def _requeue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._waiting.appendleft(seq)

    def _room(self, plan: StepPlan) -> int | float:
        limit = self._config.max_batch_size
        if limit is None:
            return math.inf
        return limit - len(self._running) - plan.pending_rows - len(plan.chunks)

    def _has_room(self, plan: StepPlan) -> bool:
        return self._room(plan) > 0

    def _reserved_tokens(self) -> int:
        if self._config.max_batch_total_tokens is None:
            return 0
        return sum(seq.prompt_len + seq.max_new_tokens
                   for seq in self._running + self._prefilling)

    # ------------------------------------------------------------------ block bookkeeping

    def _mark_computed(self, seq: Sequence, num_computed: int, *, commit: bool) -> None:
        seq.num_computed = num_computed
        if commit:
            self._blocks.commit(seq.request_id, seq.token_ids, num_computed)

    def _release(self, seq: Sequence) -> None:
        """Take a prefilling or running request out of its list and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
            # The shards still decode it: the engine filters their batch before the next step.
            self._batch_changed = True
        else:
            self._prefilling.remove(seq)
        self._blocks.free(seq.request_id)
        seq.blocks = []
        seq.num_computed = 0
