"""The sampler's Triton passes: the seeded Gumbel-max draw, and the greedy pick with its
log-probability (GPU; tests use the interpreter).

Draw. `sampling.sample` draws argmax(score + g) with g = -log(-log(u)) and u a splitmix64
hash of (row key, token id). In torch that is about twenty elementwise kernels over [N, V]
int64 and float tensors; here each program reads its row's scores once, hashes and
compares in registers, and writes one index: the memory floor is N * V * 4 bytes read.
Same hash and same formula as the torch path, so the same token up to the last bit of
the logarithms (the GPU's log may differ from the CPU's by an ulp, which can flip an
exact near-tie: draws agree across ranks and batches, which use the same path).

Greedy pick. A batch with no draw and no top-n alternatives needs only argmax(x) and its
log-probability x[argmax] - logsumexp(x) per row, not the [N, V] log-softmax. A reduction
over one row on one program leaves most of the GPU idle (a 128K-token row took ~30 us per
torch reduction on an H100), so each row is split into contiguous chunks, one program each,
with about `_PROGRAMS_PER_SM` programs per SM over the whole batch. A program streams its
chunk once and keeps (max, first index of the max, sum of exp(x - max)), rescaling the sum
when the max grows (the online softmax); a second launch, one program per row, merges the
chunks' triples. Chunks are in token order and each keeps its first maximum, so the first
chunk holding the row's maximum holds its smallest token id: ties resolve as torch.argmax.
Floor: N * V * 4 bytes read, two launches. The grid depends on shapes and the SM count
only, so both passes can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import num_sms

_BLOCK = 2048
_GREEDY_BLOCK = 1024
_PROGRAMS_PER_SM = 4


@triton.jit
def _gumbel_argmax_kernel(scores_ptr, keys_ptr, out_ptr, vocab_size, row_stride,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int64)
    for start in range(0, vocab_size, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        mask = tokens < vocab_size
        scores = tl.load(scores_ptr + row * row_stride + tokens, mask=mask, other=float("-inf"))
        # splitmix64 of key + token, as sampling.splitmix64 computes it.
        z = key + tokens.to(tl.uint64) + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        uniform = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        values = scores - tl.log(-tl.log(uniform))
        values = tl.where(mask, values, float("-inf"))
        block_best = tl.max(values, axis=0)
        block_index = tl.argmax(values, axis=0)
        take = block_best > best  # strict: the first maximum wins, as in torch.argmax
        best = tl.where(take, block_best, best)
        best_index = tl.where(take, start + block_index.to(tl.int64), best_index)
    tl.store(out_ptr + row, best_index)


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax over tokens of scores[n] + Gumbel noise hashed from keys[n] -> [N] int64.

    scores: [N, V] float32, last dimension contiguous; keys: [N] int64 (draw_keys).
    """
    _check_scores(scores)
    if keys.dtype != torch.int64 or keys.shape != scores.shape[:1]:
        raise ValueError(f"keys must be [{scores.shape[0]}] int64, got {keys.dtype} "
                         f"{tuple(keys.shape)}")
    out = torch.empty(scores.shape[0], dtype=torch.int64, device=scores.device)
    if scores.shape[0]:
        _gumbel_argmax_kernel[(scores.shape[0],)](
            scores, keys.contiguous(), out, scores.shape[1], scores.stride(0), BLOCK=_BLOCK,
            num_warps=8)
    return out


@triton.jit
def _greedy_chunk_kernel(scores_ptr, max_ptr, index_ptr, sum_ptr, vocab_size, row_stride, chunk,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    chunk_start = split * chunk
    chunk_end = tl.minimum(chunk_start + chunk, vocab_size)
    row_scores = scores_ptr + row.to(tl.int64) * row_stride
    best = tl.full((), float("-inf"), tl.float32)
    best_index = chunk_start.to(tl.int64)
    total = tl.full((), 0.0, tl.float32)  # sum of exp(x - best) over the chunk so far
    for start in range(chunk_start, chunk_end, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        values = tl.load(row_scores + tokens, mask=tokens < chunk_end, other=float("-inf"))
        block_best, block_index = tl.max(values, axis=0, return_indices=True)
        new_best = tl.maximum(best, block_best)
        # While everything so far is -inf, exponents are taken against 0, not -inf, so that
        # exp(-inf - -inf) = nan never enters the sum.
        reference = tl.where(new_best == float("-inf"), 0.0, new_best)
        total = total * tl.exp(best - reference) + tl.sum(tl.exp(values - reference), axis=0)
        take = block_best > best  # strict: the first maximum wins, as in torch.argmax
        best_index = tl.where(take, start + block_index.to(tl.int64), best_index)
        best = new_best
    slot = row * tl.num_programs(1) + split
    tl.store(max_ptr + slot, best)
    tl.store(index_ptr + slot, best_index)
    tl.store(sum_ptr + slot, total)


@triton.jit
def _greedy_merge_kernel(max_ptr, index_ptr, sum_ptr, next_ptr, logprob_ptr, splits,
                         SPLITS: tl.constexpr):
    row = tl.program_id(0)
    split = tl.arange(0, SPLITS)
    mask = split < splits
    maxima = tl.load(max_ptr + row * splits + split, mask=mask, other=float("-inf"))
    indices = tl.load(index_ptr + row * splits + split, mask=mask, other=0)
    sums = tl.load(sum_ptr + row * splits + split, mask=mask, other=0.0)
    best, first = tl.max(maxima, axis=0, return_indices=True)  # ties: the first chunk
    next_id = tl.sum(tl.where(split == first, indices, 0), axis=0)
    reference = tl.where(best == float("-inf"), 0.0, best)
    total = tl.sum(sums * tl.exp(maxima - reference), axis=0)
    # x[next] - logsumexp(x) with logsumexp = reference + log(total); nan on a row of -inf
    # only, as log_softmax gives.
    tl.store(next_ptr + row, next_id)
    tl.store(logprob_ptr + row, (best - reference) - tl.log(total))


def greedy_chunks(rows: int, vocab_size: int, sms: int, block: int) -> tuple[int, int]:
    """(chunks per row, tokens per chunk): about `_PROGRAMS_PER_SM` programs per SM in all,
    each chunk a whole number of blocks, none empty."""
    blocks = triton.cdiv(vocab_size, block)
    wanted = min(blocks, max(1, triton.cdiv(sms * _PROGRAMS_PER_SM, rows)))
    chunk = triton.cdiv(blocks, wanted) * block
    return triton.cdiv(vocab_size, chunk), chunk


def greedy_pick(scores: torch.Tensor, block: int = _GREEDY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [N] int64, its log-softmax [N] float32) of each row of scores [N, V].

    scores: float32, last dimension contiguous, V >= 1. Ties go to the smallest token id;
    `block` (a power of two) is the tokens a program loads at once.
    """
    _check_scores(scores)
    rows, vocab_size = scores.shape
    if vocab_size < 1 or block < 16 or block & (block - 1):
        raise ValueError(f"need vocab >= 1 and block a power of two >= 16, got vocab {vocab_size}, "
                         f"block {block}")
    next_ids = torch.empty(rows, dtype=torch.int64, device=scores.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=scores.device)
    if rows == 0:
        return next_ids, logprobs
    splits, chunk = greedy_chunks(rows, vocab_size, num_sms(scores.device), block)
    maxima = torch.empty((rows, splits), dtype=torch.float32, device=scores.device)
    indices = torch.empty((rows, splits), dtype=torch.int64, device=scores.device)
    sums = torch.empty((rows, splits), dtype=torch.float32, device=scores.device)
    _greedy_chunk_kernel[(rows, splits)](scores, maxima, indices, sums, vocab_size, scores.stride(0),
                                         chunk, BLOCK=block, num_warps=4)
    _greedy_merge_kernel[(rows,)](maxima, indices, sums, next_ids, logprobs, splits,
                                  SPLITS=triton.next_power_of_2(splits), num_warps=1)
    return next_ids, logprobs


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dtype != torch.float32 or scores.dim() != 2 or scores.stride(-1) != 1:
        raise ValueError(f"scores must be [N, V] float32 with contiguous rows, got "
                         f"{scores.dtype} {tuple(scores.shape)} strides {scores.stride()}")
