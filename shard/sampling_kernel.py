"""The seeded Gumbel-max draw as one Triton pass per row (GPU; tests use the interpreter).

`sampling.sample` draws argmax(score + g) with g = -log(-log(u)) and u a splitmix64 hash
of (row key, token id). In torch that is about twenty elementwise kernels over [N, V]
int64 and float tensors; here each program reads its row's scores once, hashes and
compares in registers, and writes one index: the memory floor is N * V * 4 bytes read.
Same hash and same formula as the torch path, so the same token up to the last bit of
the logarithms (the GPU's log may differ from the CPU's by an ulp, which can flip an
exact near-tie: draws agree across ranks and batches, which use the same path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


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
    if scores.dtype != torch.float32 or scores.dim() != 2 or scores.stride(-1) != 1:
        raise ValueError(f"scores must be [N, V] float32 with contiguous rows, got "
                         f"{scores.dtype} {tuple(scores.shape)} strides {scores.stride()}")
    if keys.dtype != torch.int64 or keys.shape != scores.shape[:1]:
        raise ValueError(f"keys must be [{scores.shape[0]}] int64, got {keys.dtype} "
                         f"{tuple(keys.shape)}")
    out = torch.empty(scores.shape[0], dtype=torch.int64, device=scores.device)
    if scores.shape[0]:
        _gumbel_argmax_kernel[(scores.shape[0],)](
            scores, keys.contiguous(), out, scores.shape[1], scores.stride(0), BLOCK=_BLOCK,
            num_warps=8)
    return out
