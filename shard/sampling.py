"""Logits processors and the sampler, vectorised over the rows of a step.

Each row is one request that picks a token this step. Its parameters live in
`SamplingBatch` as tensors (one value per row), so a step runs a fixed number of tensor
ops whatever the mix of parameters; host-side flags only skip processors no row uses.

Order (generate.proto): watermark bias, then repetition / frequency / presence penalties
on the raw logits; then, for rows that sample, temperature, top-k, top-p, typical-p and
min-p; then a greedy pick or a seeded draw.

Choices worth knowing:
- A row samples when `do_sample` is set and `temperature > 0`; temperature 0 is greedy.
  Greedy rows ignore temperature and the filters (they cannot change the argmax except
  typical-p, which is a sampling method).
- Log-probabilities (of the chosen token and of the top-n alternatives) are the
  log-softmax of the *processed* logits, as TGI reports them: penalties always, and for
  sampled rows temperature and filtering too. Filtered-out tokens have -inf and are never
  offered as alternatives.
- A seeded draw is a Gumbel-max (exponential race) whose noise for token t is a
  splitmix64 hash of (seed, n, t), n being the index of the generated token. It depends on
  nothing else: not the batch, its order, or the rank, so every tensor-parallel rank picks
  the same token without a collective and a request replays identically in any batch.
  On CUDA one Triton pass per row does the draw (shard/sampling_kernel.py).
- A batch of greedy rows only that asks no top-n alternatives computes what it returns:
  argmax and x[argmax] - logsumexp(x) per row, never the [N, V] log-softmax. On CUDA that
  is two Triton launches that split each row over many programs (a one-row reduction
  otherwise runs on one SM); the torch path elsewhere. Same token, logprob to rounding.
- Watermark ("A Watermark for Large Language Models", Kirchenbauer et al.): adds
  `WATERMARK_DELTA` to a green list of about `WATERMARK_GAMMA` of the vocabulary, keyed
  by the previous token. The green list comes from the same counter hash
  (hash(previous token, t) < gamma) instead of a seeded permutation, which keeps it one
  tensor op per step; a detector must use this same rule.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from shardgen.common.sampling_params import SamplingParams
from shardgen.shard.transfers import device_tensor

WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
_WATERMARK_KEY = 15485863  # the hash key of the paper's reference code


def _to_int64(value: int) -> int:
    """The two's-complement int64 with the same 64 bits as unsigned `value`."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MIX1 = _to_int64(0xBF58476D1CE4E5B9)
_MIX2 = _to_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output function on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def hash_uniform(row_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1) [N, V] from int64 keys [N]: one per (key, token id)."""
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=row_keys.device)
    bits = _shift_right(splitmix64(row_keys[:, None] + tokens[None, :]), 40)  # top 24 bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def draw_keys(seeds: torch.Tensor, draw_index: torch.Tensor) -> torch.Tensor:
    """The hash key of the n-th draw of each seed ([N] int64 each)."""
    return splitmix64(splitmix64(seeds) ^ draw_index)


@dataclass(frozen=True)
class _Flags:
    """Which processors some row of the batch needs (host-side, to skip the others)."""

    any_sample: bool
    all_sample: bool
    top_k: bool
    top_k_window: int   # max top_k when every sampled row has one, else 0
    top_p: bool
    typical_p: bool
    min_p: bool
    repetition: bool
    counts: bool
    watermark: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> _Flags:
        sampled = [p for p in params if p.samples]
        return cls(
            any_sample=bool(sampled),
            all_sample=len(sampled) == len(params),
            top_k=any(p.top_k > 0 for p in sampled),
            top_k_window=max(p.top_k for p in sampled) if all(p.top_k > 0 for p in sampled)
            and sampled else 0,
            top_p=any(p.top_p < 1.0 for p in sampled),
            typical_p=any(p.typical_p < 1.0 for p in sampled),
            min_p=any(p.min_p > 0.0 for p in sampled),
            repetition=any(p.repetition_penalty != 1.0 for p in params),
            counts=any(p.counts_tokens for p in params),
            watermark=any(p.watermark for p in params),
        )


class SamplingBatch:
    """Per-row sampling parameters as tensors, and the token statistics penalties need.

    `seen` [B, V] bool marks every token of a row's sequence (prompt and generated) for
    the repetition penalty; `counts` [B, V] int32 counts its generated tokens for the
    frequency and presence penalties. Each exists only when some row needs it; rows that
    do not are zero. `observe` updates both in place after a step; `select` and `concat`
    build new batches and leave their inputs untouched.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device,
                 seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> None:
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = device
        self.flags = _Flags.of(self.params)
        self.seen = seen if self.flags.repetition else None
        self.counts = counts if self.flags.counts else None
        # Rows that draw, as an index, when greedy rows ride along (else every row draws).
        # Through page-locked memory: a pageable copy would wait for the steps queued before.
        self.sample_index = None if self.flags.all_sample else device_tensor(
            [i for i, p in enumerate(self.params) if p.samples], torch.int64, device)
        floats = device_tensor(
            [[p.temperature, p.top_p, p.typical_p, p.min_p, p.repetition_penalty,
              p.frequency_penalty, p.presence_penalty] for p in self.params],
            torch.float32, device).reshape(-1, 7)
        (self.temperature, self.top_p, self.typical_p, self.min_p, self.repetition_penalty,
         self.frequency_penalty, self.presence_penalty) = floats.unbind(1)
        ints = device_tensor([[p.top_k, _to_int64(p.seed), int(p.watermark)] for p in self.params],
                             torch.int64, device).reshape(-1, 3)
        self.top_k, self.seed, watermark = ints.unbind(1)
        self.watermark = watermark.bool()

    def __len__(self) -> int:
        return len(self.params)

    @classmethod
    def for_sequences(cls, params: Sequence[SamplingParams], sequences: Sequence[Sequence[int]],
                      num_generated: Sequence[int], vocab_size: int,
                      device: torch.device) -> SamplingBatch:
        """A batch of new rows; `sequences` are all their tokens so far, of which the last
        `num_generated` were generated (after a preemption)."""
        flags = _Flags.of(params)
        seen = counts = None
        if flags.repetition:
            seen = torch.zeros((len(params), vocab_size), dtype=torch.bool, device=device)
            for row, (p, tokens) in enumerate(zip(params, sequences)):
                if p.repetition_penalty != 1.0:
                    seen[row, torch.tensor(tokens, dtype=torch.int64, device=device)] = True
        if flags.counts:
            counts = torch.zeros((len(params), vocab_size), dtype=torch.int32, device=device)
            for row, (p, tokens, n) in enumerate(zip(params, sequences, num_generated)):
                if p.counts_tokens and n > 0:
                    generated = torch.tensor(tokens[len(tokens) - n:], dtype=torch.int64)
                    counts[row] = torch.bincount(generated, minlength=vocab_size).to(device)
        return cls(params, vocab_size, device, seen, counts)

    def select(self, rows: Sequence[int]) -> SamplingBatch:
        """The batch of the given rows, in that order."""
        index = device_tensor(list(rows), torch.int64, self.device)
        seen = self.seen.index_select(0, index) if self.seen is not None else None
        counts = self.counts.index_select(0, index) if self.counts is not None else None
        return SamplingBatch([self.params[r] for r in rows], self.vocab_size, self.device,
                             seen, counts)

    @classmethod
    def concat(cls, batches: Sequence[SamplingBatch]) -> SamplingBatch:
        """Rows of all `batches`, in order (at least one batch)."""
        first = batches[0]
        if len(batches) == 1:
            return first
        params = [p for b in batches for p in b.params]
        seen = _concat_optional([b.seen for b in batches], [len(b) for b in batches],
                                first.vocab_size, torch.bool, first.device)
        counts = _concat_optional([b.counts for b in batches], [len(b) for b in batches],
                                  first.vocab_size, torch.int32, first.device)
        return cls(params, first.vocab_size, first.device, seen, counts)

    def observe(self, next_ids: torch.Tensor) -> None:
        """Account the tokens just generated ([B] int64) for the penalties."""
        rows = torch.arange(len(self.params), device=self.device)
        if self.seen is not None:
            self.seen[rows, next_ids] = True
        if self.counts is not None:
            self.counts[rows, next_ids] += 1


def _concat_optional(parts: list[torch.Tensor | None], lengths: list[int], vocab_size: int,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if all(part is None for part in parts):
        return None
    filled = [part if part is not None else torch.zeros((n, vocab_size), dtype=dtype, device=device)
              for part, n in zip(parts, lengths)]
    return torch.cat(filled)


@dataclass(frozen=True)
class SampleOutput:
    """The pick of every row: token, its log-probability, and the top-n alternatives."""

    next_ids: torch.Tensor       # [N] int64
    logprobs: torch.Tensor       # [N] float32
    top_ids: torch.Tensor        # [N, top_n] int64
    top_logprobs: torch.Tensor   # [N, top_n] float32


def sample(logits: torch.Tensor, batch: SamplingBatch, draw_index: torch.Tensor,
           previous_tokens: torch.Tensor, top_n: int = 0) -> SampleOutput:
    """Pick one token per row of `logits` [N, V] (float32; not modified).

    `draw_index` [N] int64 is the index n of the token each row generates now (seeded
    draws depend on (seed, n) only); `previous_tokens` [N] int64 is each row's last
    token (the watermark's key); `top_n` alternatives are returned for every row.
    """
    scores = apply_penalties(logits, batch, previous_tokens)
    if not batch.flags.any_sample and top_n == 0:
        kernels = _kernels() if scores.is_cuda else None
        next_ids, chosen = (kernels.greedy_pick if kernels else greedy_pick)(scores.contiguous())
        return SampleOutput(next_ids, chosen, *_no_alternatives(next_ids, chosen))
    if batch.flags.any_sample:
        rows = batch.sample_index
        drawn, warped = _draw(scores if rows is None else scores[rows], batch, draw_index, rows)
        if rows is None:
            scores, next_ids = warped, drawn
        else:
            next_ids = scores.argmax(dim=-1)
            next_ids[rows] = drawn
            scores = scores.index_copy(0, rows, warped)
    else:
        next_ids = scores.argmax(dim=-1)
    logprobs = torch.log_softmax(scores, dim=-1)
    chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1)
    if top_n > 0:
        top_logprobs, top_ids = logprobs.topk(top_n, dim=-1)
    else:
        top_ids, top_logprobs = _no_alternatives(next_ids, chosen)
    return SampleOutput(next_ids, chosen, top_ids, top_logprobs)


def _no_alternatives(next_ids: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty [N, 0] (ids, log-probabilities), the top-n alternatives for top_n == 0."""
    return next_ids.new_empty((len(next_ids), 0)), chosen.new_empty((len(chosen), 0))


def greedy_pick(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, its log-softmax) per row of scores [N, V]: the torch path (ties: smallest id)."""
    next_ids = scores.argmax(dim=-1)
    chosen = scores.gather(1, next_ids[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1)
    return next_ids, chosen


def _draw(scores: torch.Tensor, batch: SamplingBatch, draw_index: torch.Tensor,
          rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the sampled rows' scores and draw from them; returns (ids, warped scores)."""

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values if rows is None else values[rows]

    warped = apply_warpers(scores, batch.flags, pick(batch.temperature), pick(batch.top_k),
                           pick(batch.top_p), pick(batch.typical_p), pick(batch.min_p))
    keys = draw_keys(pick(batch.seed), pick(draw_index))
    kernels = _kernels() if warped.is_cuda else None
    return (kernels.gumbel_argmax if kernels else gumbel_argmax)(warped.contiguous(), keys), warped


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax(scores + Gumbel noise hashed from (key, token)) per row: the torch path."""
    gumbel = -torch.log(-torch.log(hash_uniform(keys, scores.shape[-1])))
    return (scores + gumbel).argmax(dim=-1)


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton passes (shard/sampling_kernel.py), or None without Triton."""
    try:
        from shardgen.shard import sampling_kernel
    except ImportError:
        return None
    return sampling_kernel


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch,
                    previous_tokens: torch.Tensor) -> torch.Tensor:
    """Watermark bias, then repetition (HF) and frequency/presence (OpenAI) penalties."""
    scores = logits
    if batch.flags.watermark:
        keys = splitmix64(previous_tokens * _WATERMARK_KEY)
        green = hash_uniform(keys, logits.shape[-1]) < WATERMARK_GAMMA
        scores = scores + (green & batch.watermark[:, None]).to(scores.dtype) * WATERMARK_DELTA
    if batch.seen is not None:
        penalty = batch.repetition_penalty[:, None]
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(batch.seen, penalized, scores)
    if batch.counts is not None:
        counts = batch.counts.to(scores.dtype)
        scores = (scores - counts * batch.frequency_penalty[:, None]
                  - (counts > 0).to(scores.dtype) * batch.presence_penalty[:, None])
    return scores


def apply_warpers(scores: torch.Tensor, flags: _Flags, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, typical_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, top-p, typical-p and min-p (each with HF semantics, each
    a no-op on rows where it is disabled); removed tokens get -inf."""
    scores = scores / temperature[:, None]
    if flags.top_k or flags.top_p:
        scores = _top_k_top_p(scores, top_k, top_p, flags)
    if flags.typical_p:
        scores = _typical_p(scores, typical_p)
    if flags.min_p:
        probs = scores.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    return scores


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 flags: _Flags) -> torch.Tensor:
    """Both filters as one score threshold per row, from one descending sort.

    Top-k keeps the scores at least the k-th; top-p keeps the smallest sorted prefix whose
    probability (after top-k) reaches top_p, and its threshold is the last score kept.
    Ties with a threshold stay (HF's top-k rule; HF's top-p breaks such ties by sort
    position, which would make the kept set depend on the sort).

    When every row has a top_k, only the top max(top_k) scores are sorted. Nothing past
    them is kept but ties with a row's k-th score, which sort last among its kept tokens:
    with the kept mass taken over the whole vocabulary, the cut falls where a full sort
    puts it, so the result does not depend on max(top_k), i.e. on the batch.
    """
    vocab_size = scores.shape[-1]
    width = min(flags.top_k_window or vocab_size, vocab_size)
    if width < vocab_size:
        sorted_scores = scores.topk(width, dim=-1).values
    else:
        sorted_scores = scores.sort(dim=-1, descending=True).values
    threshold = torch.full_like(sorted_scores[:, :1], float("-inf"))
    if flags.top_k:
        k = torch.where(top_k > 0, top_k, width).clamp(max=width)
        threshold = sorted_scores.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < threshold, float("-inf"))
        sorted_scores = sorted_scores.masked_fill(sorted_scores < threshold, float("-inf"))
    if flags.top_p:
        probs = (sorted_scores - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        kept = (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]  # a prefix of each row
        last = (kept.sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # the best token always stays
        threshold = torch.maximum(threshold, sorted_scores.gather(1, last))
    return scores.masked_fill(scores < threshold, float("-inf"))


def _typical_p(scores: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy until their mass reaches
    typical_p (HF TypicalLogitsWarper, at least one token)."""
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = distance.sort(dim=-1)
    sorted_probs = probs.gather(1, order)
    mass = sorted_probs.cumsum(dim=-1)
    last = (mass < typical_p[:, None]).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    remove_sorted = sorted_distance > sorted_distance.gather(1, last[:, None])
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    remove &= (typical_p < 1.0)[:, None]
    return scores.masked_fill(remove, float("-inf"))
