"""Per-request decode state, and the tensors of one step.

A `DecodeBatch` is the shard's memory of the requests of one cached batch between steps.
Its per-row state is a handful of numpy arrays (block table, lengths, last token, token
counters), so the bookkeeping of a step is a few vectorised host ops whatever the batch
size; the sampling parameters and penalty statistics live on the device
(`SamplingBatch`). A `NewSequence` is one request of a Prefill, parsed and validated.

`build_step` lays out one varlen step: the running rows first (one token each), then
the new sequences (whole prompts or chunks). All its host integers travel to the device
in one copy, the block table in a second (non-blocking, through pinned memory on CUDA).
A batch that only decodes and is unchanged since its last step takes its input ids from
the device, where the sampler left them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shardgen.proto import generate_pb2
from shardgen.shard.layers.attention import AttentionMetadata
from shardgen.common.sampling_params import SamplingParams
from shardgen.shard.sampling import SamplingBatch
from shardgen.shard.transfers import device_tensor


@dataclass(frozen=True)
class StoppingParams:
    """When the shard ends a request on its own."""

    max_new_tokens: int
    ignore_eos: bool
    stop_token_ids: frozenset[int]


@dataclass(frozen=True)
class CacheLimits:
    """What a request must fit in: the model and the allocated KV cache."""

    block_size: int
    num_blocks: int
    vocab_size: int
    max_positions: int


def _check_blocks(request_id: int, blocks: Sequence[int], limits: CacheLimits) -> None:
    if blocks and (min(blocks) < 1 or max(blocks) >= limits.num_blocks):
        raise ValueError(f"request {request_id}: block ids must be in [1, {limits.num_blocks}) "
                         f"(block 0 is reserved), got {sorted(set(blocks))[:8]}...")


@dataclass(frozen=True)
class NewSequence:
    """One request of a Prefill: compute input_ids[start:end], sample if end is the end."""

    request_id: int
    input_ids: list[int]
    blocks: list[int]
    slots: list[int]            # slots of positions start .. end-1
    start: int
    end: int
    sampling: SamplingParams
    stopping: StoppingParams
    prefill_logprobs: bool
    top_n_tokens: int
    generated_offset: int

    @property
    def finishes_prompt(self) -> bool:
        """Whether this chunk reaches the end of input_ids (then a token is sampled)."""
        return self.end == len(self.input_ids)

    @classmethod
    def from_proto(cls, request: generate_pb2.Request, limits: CacheLimits) -> NewSequence:
        """Parse and validate; ValueError names the request, the value and the limit."""
        rid = request.id
        ids = list(request.input_ids)
        total, start = len(ids), request.cache_len
        if total == 0:
            raise ValueError(f"request {rid}: input_ids is empty")
        if total > limits.max_positions:
            raise ValueError(f"request {rid}: {total} input tokens exceed the model's "
                             f"{limits.max_positions} positions")
        if start >= total:
            raise ValueError(f"request {rid}: cache_len {start} must be less than the "
                             f"{total} input tokens")
        end = total if request.chunk_len == 0 else start + request.chunk_len
        if end > total:
            raise ValueError(f"request {rid}: cache_len {start} + chunk_len {request.chunk_len} "
                             f"exceeds the {total} input tokens")
        if len(request.slots) != total - start:
            raise ValueError(f"request {rid}: {len(request.slots)} slots for {total - start} "
                             f"positions from cache_len {start} to the end of input_ids")
        if len(request.blocks) * limits.block_size < end:
            raise ValueError(f"request {rid}: {len(request.blocks)} blocks of {limits.block_size} "
                             f"cannot hold {end} tokens")
        if max(ids) >= limits.vocab_size:
            raise ValueError(f"request {rid}: token id {max(ids)} is outside the vocabulary "
                             f"of {limits.vocab_size}")
        blocks = list(request.blocks)
        _check_blocks(rid, blocks, limits)
        slots = list(request.slots[:end - start])
        if min(slots) < limits.block_size or max(slots) >= limits.num_blocks * limits.block_size:
            raise ValueError(f"request {rid}: slots must be in [{limits.block_size}, "
                             f"{limits.num_blocks * limits.block_size}) (block 0 is reserved), "
                             f"got {min(slots)}..{max(slots)}")
        stopping = request.stopping_parameters
        if stopping.max_new_tokens < 1:
            raise ValueError(f"request {rid}: max_new_tokens must be at least 1, "
                             f"got {stopping.max_new_tokens}")
        if request.generated_offset >= total:
            raise ValueError(f"request {rid}: generated_offset {request.generated_offset} must be "
                             f"less than the {total} input tokens")
        sampling = SamplingParams.from_proto(request.parameters)
        try:
            sampling.validate()
        except ValueError as error:
            raise ValueError(f"request {rid}: {error}") from None
        return cls(
            request_id=rid, input_ids=ids, blocks=blocks, slots=slots, start=start, end=end,
            sampling=sampling,
            stopping=StoppingParams(stopping.max_new_tokens, stopping.ignore_eos_token,
                                    frozenset(stopping.stop_token_ids)),
            prefill_logprobs=request.prefill_logprobs, top_n_tokens=request.top_n_tokens,
            generated_offset=request.generated_offset)


def _padded(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    table = np.zeros((len(rows), width), dtype=np.int32)
    for r, blocks in enumerate(rows):
        table[r, :len(blocks)] = blocks
    return table


@dataclass(eq=False)
class DecodeBatch:
    """The running requests of one cached batch, one row each.

    Row state: `seq_lens` counts every token of the sequence including `last_tokens`,
    the one generated last, whose KV the next step writes at position seq_lens - 1.
    `num_generated` includes tokens generated before a preemption (generated_offset):
    it is the index n of the next seeded draw. `last_tokens_device` is the device copy
    of `last_tokens` that the last step sampled (None when the rows changed since).
    `select`, `concat` and `with_extensions` return new batches (sharing what they do
    not change); only `advance`, the commit of a step, changes a batch in place.
    """

    batch_id: int
    request_ids: list[int]
    stopping: list[StoppingParams]
    top_n_tokens: list[int]
    block_tables: np.ndarray    # [B, W] int32, rows padded with 0
    num_blocks: np.ndarray      # [B] blocks of each row's table
    seq_lens: np.ndarray        # [B]
    last_tokens: np.ndarray     # [B]
    num_generated: np.ndarray   # [B]
    max_generated: np.ndarray   # [B] generated_offset + max_new_tokens
    sampling: SamplingBatch
    last_tokens_device: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.request_ids)

    @classmethod
    def from_new(cls, batch_id: int, sequences: Sequence[NewSequence], vocab_size: int,
                 device: torch.device) -> DecodeBatch:
        """Rows for prompts whose last chunk runs in this step (their last prompt token
        is the one the step feeds; `advance` then appends the sampled one)."""
        offsets = np.array([s.generated_offset for s in sequences], dtype=np.int64)
        sampling = SamplingBatch.for_sequences(
            [s.sampling for s in sequences], [s.input_ids for s in sequences], offsets.tolist(),
            vocab_size, device)
        width = max((len(s.blocks) for s in sequences), default=0)
        return cls(
            batch_id, [s.request_id for s in sequences], [s.stopping for s in sequences],
            [s.top_n_tokens for s in sequences], _padded([s.blocks for s in sequences], width),
            np.array([len(s.blocks) for s in sequences], dtype=np.int64),
            np.array([len(s.input_ids) for s in sequences], dtype=np.int64),
            np.array([s.input_ids[-1] for s in sequences], dtype=np.int64),
            offsets, offsets + np.array([s.stopping.max_new_tokens for s in sequences]),
            sampling)

    def select(self, rows: Sequence[int]) -> DecodeBatch:
        """The batch of the given rows, in that order."""
        index = np.asarray(rows, dtype=np.int64)
        return DecodeBatch(
            self.batch_id, [self.request_ids[r] for r in rows], [self.stopping[r] for r in rows],
            [self.top_n_tokens[r] for r in rows], self.block_tables[index], self.num_blocks[index],
            self.seq_lens[index], self.last_tokens[index], self.num_generated[index],
            self.max_generated[index], self.sampling.select(rows))

    @classmethod
    def concat(cls, batch_id: int, batches: Sequence[DecodeBatch]) -> DecodeBatch:
        """All rows of `batches` (at least one), in order, under `batch_id`."""
        if len(batches) == 1:
            return dataclasses.replace(batches[0], batch_id=batch_id)
        width = max(b.block_tables.shape[1] for b in batches)
        tables = [np.pad(b.block_tables, ((0, 0), (0, width - b.block_tables.shape[1])))
                  for b in batches]
        return cls(
            batch_id, [r for b in batches for r in b.request_ids],
            [s for b in batches for s in b.stopping], [n for b in batches for n in b.top_n_tokens],
            np.concatenate(tables), *(np.concatenate([getattr(b, name) for b in batches]) for name in (
                "num_blocks", "seq_lens", "last_tokens", "num_generated", "max_generated")),
            SamplingBatch.concat([b.sampling for b in batches]))

    def with_extensions(self, extensions: Mapping[int, Sequence[int]],
                        limits: CacheLimits) -> DecodeBatch:
        """A copy whose block tables have `extensions` ({request id: new blocks}) appended.

        Ids not in this batch are ignored (the caller checks that every id is somewhere).
        """
        rows = {rid: r for r, rid in enumerate(self.request_ids) if rid in extensions}
        if not rows:
            return self
        num_blocks = self.num_blocks.copy()
        for rid, r in rows.items():
            _check_blocks(rid, extensions[rid], limits)
            num_blocks[r] += len(extensions[rid])
        width = max(int(num_blocks.max()), self.block_tables.shape[1])
        tables = np.pad(self.block_tables, ((0, 0), (0, width - self.block_tables.shape[1])))
        for rid, r in rows.items():
            tables[r, self.num_blocks[r]:num_blocks[r]] = extensions[rid]
        return dataclasses.replace(self, block_tables=tables, num_blocks=num_blocks)

    def decode_slots(self, block_size: int) -> np.ndarray:
        """The slot of each row's next input token; ValueError if its block is missing."""
        positions = self.seq_lens - 1
        block_index = positions // block_size
        missing = np.nonzero(block_index >= self.num_blocks)[0]
        if len(missing):
            r = int(missing[0])
            raise ValueError(
                f"request {self.request_ids[r]} needs block {int(block_index[r])} for position "
                f"{int(positions[r])} but has {int(self.num_blocks[r])} blocks: extend its "
                f"block table with block_extensions")
        blocks = self.block_tables[np.arange(len(positions)), block_index]
        return blocks.astype(np.int64) * block_size + positions % block_size

    def advance(self, next_ids: np.ndarray, next_ids_device: torch.Tensor) -> None:
        """Commit a step: every row generated `next_ids` (host and device copies).

        The penalty statistics are not touched: the step observed its tokens on the device
        when it was launched (`SamplingBatch.observe`), before any step after it.
        """
        self.last_tokens = next_ids.astype(np.int64)
        self.last_tokens_device = next_ids_device
        self.seq_lens = self.seq_lens + 1
        self.num_generated = self.num_generated + 1

    def continuing_rows(self, max_positions: int) -> list[int]:
        """Rows that the step now running cannot stop on length: after it, each has
        generated fewer than its maximum and its next input still has a position."""
        going_on = (self.num_generated + 1 < self.max_generated) & (self.seq_lens + 1 <= max_positions)
        return np.flatnonzero(going_on).tolist()

    def successor(self, rows: Sequence[int], next_ids_device: torch.Tensor) -> DecodeBatch:
        """The given rows as the step now running leaves them (one token longer), for a
        step launched before this one's tokens reach the host: their last tokens exist only
        on the device (`next_ids_device`, one per row of this batch); `last_tokens` holds -1."""
        every_row = len(rows) == len(self)
        batch = self if every_row else self.select(rows)
        last_tokens = next_ids_device if every_row else next_ids_device.index_select(
            0, device_tensor(rows, torch.int64, next_ids_device.device))
        return dataclasses.replace(
            batch, seq_lens=batch.seq_lens + 1, num_generated=batch.num_generated + 1,
            last_tokens=np.full(len(rows), -1, dtype=np.int64), last_tokens_device=last_tokens)

    def has_next_slots(self, block_size: int) -> bool:
        """Whether every row's block table covers the position its next input goes to."""
        return bool(np.all((self.seq_lens - 1) // block_size < self.num_blocks))


@dataclass
class StepInputs:
    """The device tensors of one step and where its outputs go.

    `sample_rows` are the rows of the step's hidden states whose logits pick a token, in
    the order of the step's sampled DecodeBatch. `prefill_spans[i]` is (first hidden row,
    count) of new sequence i when it asked for prompt log-probabilities, else None.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: torch.Tensor
    draw_index: torch.Tensor        # [S] index n of each sampled row's draw
    previous_tokens: torch.Tensor   # [S] each sampled row's last token
    prefill_spans: list[tuple[int, int] | None]


class _Layout:
    """Host-side lists of a step, filled sequence by sequence."""

    def __init__(self) -> None:
        self.input_ids: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.query_lens: list[np.ndarray] = []
        self.seq_lens: list[np.ndarray] = []   # per sequence: tokens in cache after the step
        self.sample_rows: list[np.ndarray] = []
        self.prefill_spans: list[tuple[int, int] | None] = []
        self.num_tokens = 0
        self.draw_index = np.empty(0, dtype=np.int64)
        self.previous_tokens = np.empty(0, dtype=np.int64)

    def add_running(self, running: DecodeBatch, block_size: int) -> None:
        """One decode token per running row; every row samples."""
        n = len(running)
        self.input_ids.append(running.last_tokens)
        self.positions.append(running.seq_lens - 1)
        self.slots.append(running.decode_slots(block_size))
        self.query_lens.append(np.ones(n, dtype=np.int64))
        self.seq_lens.append(running.seq_lens)
        self.sample_rows.append(np.arange(self.num_tokens, self.num_tokens + n))
        self.num_tokens += n

    def add_new(self, seq: NewSequence) -> None:
        """A prompt chunk; its last token samples when the chunk ends the prompt."""
        n = seq.end - seq.start
        self.input_ids.append(np.asarray(seq.input_ids[seq.start:seq.end], dtype=np.int64))
        self.positions.append(np.arange(seq.start, seq.end, dtype=np.int64))
        self.slots.append(np.asarray(seq.slots, dtype=np.int64))
        self.query_lens.append(np.array([n], dtype=np.int64))
        self.seq_lens.append(np.array([seq.end], dtype=np.int64))
        self.prefill_spans.append((self.num_tokens, n) if seq.prefill_logprobs else None)
        if seq.finishes_prompt:
            self.sample_rows.append(np.array([self.num_tokens + n - 1]))
        self.num_tokens += n


Upload = Callable[[np.ndarray], torch.Tensor]


def build_step(running: DecodeBatch | None, new: Sequence[NewSequence], block_size: int,
               device: torch.device, sampled: DecodeBatch | None,
               upload: Upload | None = None) -> StepInputs:
    """Lay out one step: `running` rows decode one token each, `new` compute their chunk.

    `sampled` is the batch of the rows that pick a token (running rows, then the new
    sequences that finish their prompt): its draw indices and last tokens go along.
    `upload` sends a host array to the device (shard/transfers.PinnedUpload); None is a
    plain copy.
    """
    layout = _Layout()
    if sampled is not None:
        layout.draw_index = sampled.num_generated
        layout.previous_tokens = sampled.last_tokens
    tables: list[np.ndarray] = []
    if running is not None and len(running):
        layout.add_running(running, block_size)
        tables.append(running.block_tables)
    for seq in new:
        layout.add_new(seq)
        tables.append(np.asarray(seq.blocks, dtype=np.int32)[None, :])
    inputs = _to_device(layout, tables, upload or (lambda array: torch.from_numpy(array).to(device)))
    if running is not None and running.last_tokens_device is not None:
        if not new:
            # A decode-only step: its rows are the sampled ones, fed the tokens they sampled last.
            inputs.input_ids = inputs.previous_tokens = running.last_tokens_device
        elif len(running) and running.last_tokens[0] < 0:
            # A step run ahead with prompts (DecodeBatch.successor): the running rows come
            # first, and their tokens exist only on the device.
            inputs.input_ids[:len(running)].copy_(running.last_tokens_device)
            inputs.previous_tokens[:len(running)].copy_(running.last_tokens_device)
    return inputs


def _stack_tables(tables: list[np.ndarray]) -> np.ndarray:
    """Block tables of different widths, one under the other, padded with block 0."""
    out = np.zeros((sum(t.shape[0] for t in tables), max(t.shape[1] for t in tables)), dtype=np.int32)
    row = 0
    for t in tables:
        out[row:row + t.shape[0], :t.shape[1]] = t
        row += t.shape[0]
    return out


def _to_device(layout: _Layout, tables: list[np.ndarray], upload: Upload) -> StepInputs:
    query_lens = np.concatenate(layout.query_lens)
    positions = np.concatenate(layout.positions)
    seq_lens = np.concatenate(layout.seq_lens)
    cu_seqlens = np.concatenate([[0], np.cumsum(query_lens)])
    parts = [np.concatenate(layout.input_ids), positions, np.concatenate(layout.slots),
             np.concatenate(layout.sample_rows or [np.empty(0, np.int64)]), layout.draw_index,
             layout.previous_tokens, seq_lens, cu_seqlens]
    packed = upload(np.concatenate(parts).astype(np.int64))
    (input_ids, positions_t, slots, sample_rows, draw_index, previous_tokens, seq_lens_t,
     cu_seqlens_t) = packed.split([len(p) for p in parts])
    table = tables[0] if len(tables) == 1 else _stack_tables(tables)
    attn = AttentionMetadata(
        slot_mapping=slots,
        block_tables=upload(table),
        seq_lens=seq_lens_t.to(torch.int32),
        cu_seqlens_q=cu_seqlens_t.to(torch.int32),
        max_seqlen_q=int(query_lens.max()),
        max_seqlen_k=int(seq_lens.max()))
    return StepInputs(input_ids, positions_t, attn, sample_rows, draw_index, previous_tokens,
                      layout.prefill_spans)
