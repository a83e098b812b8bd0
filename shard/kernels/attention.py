"""paged_attention: causal attention of a step's new tokens over the paged KV cache.

Semantics (identical to the torch reference in shard/layers/attention.py)
  q [T, Hq, D] holds every new token of the step, sequence after sequence
  (cu_seqlens_q [B+1] int32 delimits them). k_cache, v_cache [num_blocks, block_size, Hkv, D]
  already hold this step's keys and values (write_kv ran first). Sequence b has seq_lens[b]
  tokens in cache, new ones included; its j-th position lives in slot
  block_tables[b, j // block_size] * block_size + j % block_size. Its i-th new token sits
  at position seq_lens[b] - q_len_b + i and attends to positions 0..that one, or only the
  last `sliding_window` of them when sliding_window > 0. Query head h reads KV head
  h // (Hq / Hkv). Softmax and accumulation in fp32; output [T, Hq, D] in q's dtype.
  The caches hold q's dtype or fp8 e4m3; fp8 keys and values are read as q's dtype.

  Beyond the reference: a row that sees no key at all (a padding sequence with
  seq_len 0) comes out as zeros rather than NaN.

Dispatch: max_seqlen_q == 1 with one row per sequence (T == B) is a decode step and takes
the flash-decoding kernel (attention_decode). Any other step is varlen and takes two
launches: the decode kernel over its one-token sequences (a mixed step's running rows,
one-token chunks) and the prefill kernel (attention_prefill) over the rest. Each finds
its own sequences from cu_seqlens_q on the device, so neither reads a length on the host.
Nothing else reads max_seqlen_q: both launches depend on shapes only, so one CUDA
graph serves every step of its (T, B), and a bound above the real longest query is fine.
There cu_seqlens_q[-1] may be below T (a step padded to its graph's T): rows past it come
out as zeros. Padding sequences (q_len 0, seq_len 0) may sit anywhere in the batch.

Preconditions the kernels cannot check without a device sync (so they do not):
cu_seqlens_q[-1] == T for a decode step and <= T otherwise, max_seqlen_q >= every q_len_b,
seq_lens[b] >= q_len_b, and every block id used lies in [0, num_blocks). Block table rows
only need to be valid up to each sequence's length; their width bounds the split of decode
into partitions, so keep it near the batch's longest sequence.
"""

from __future__ import annotations

import torch

from shardgen.shard.kernels.attention_decode import DecodeConfig, launch_decode
from shardgen.shard.kernels.attention_prefill import PrefillConfig, launch_prefill
from shardgen.shard.kernels.checks import (
    FP8_KV_DTYPE,
    check_contiguous,
    check_dims,
    check_float,
    check_index_dtype,
    check_last_dim_contiguous,
    check_same_device,
    is_power_of_2,
    require,
)

MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 16  # tl.dot's smallest K


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    sliding_window: int = 0,
    *,
    decode_config: DecodeConfig | None = None,
    prefill_config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal paged attention of q [T, Hq, D] -> new tensor [T, Hq, D] in q's dtype.

    See the module docstring for the contract. decode_config / prefill_config override
    the launch parameters (tests and tuning); None picks the defaults for the shapes.
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, sliding_window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    batch = seq_lens.shape[0]
    if max_seqlen_q == 1 and q.shape[0] == batch:
        launch_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out, decode_config)
        return out
    launch_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out, decode_config,
                  cu_seqlens_q=cu_seqlens_q)
    launch_prefill(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window, out, prefill_config,
    )
    return out


def _check_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    sliding_window: int,
) -> None:
    """Shapes, dtypes, layouts and devices; never reads a value off the device."""
    check_dims("q", q, 3, "[T, Hq, D]")
    check_dims("k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, D]")
    require(
        v_cache.shape == k_cache.shape,
        f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}",
    )
    check_float("q", q)
    require(
        k_cache.dtype == v_cache.dtype and k_cache.dtype in (q.dtype, FP8_KV_DTYPE),
        f"k_cache and v_cache must both be q's dtype or float8_e4m3fn, got q {q.dtype}, "
        f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}",
    )
    check_last_dim_contiguous("q", q)
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    _check_heads(q, k_cache)
    check_dims("block_tables", block_tables, 2, "[B, max_blocks]")
    check_dims("seq_lens", seq_lens, 1, "[B]")
    check_dims("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]")
    check_index_dtype("block_tables", block_tables, torch.int32)
    check_index_dtype("seq_lens", seq_lens, torch.int32)
    check_index_dtype("cu_seqlens_q", cu_seqlens_q, torch.int32)
    check_last_dim_contiguous("block_tables", block_tables)
    check_contiguous("seq_lens", seq_lens)
    check_contiguous("cu_seqlens_q", cu_seqlens_q)
    batch = seq_lens.shape[0]
    require(
        block_tables.shape[0] == batch and cu_seqlens_q.shape[0] == batch + 1,
        f"batch mismatch: seq_lens has {batch} entries, block_tables {block_tables.shape[0]} rows, "
        f"cu_seqlens_q {cu_seqlens_q.shape[0]} entries (expected {batch + 1})",
    )
    require(max_seqlen_q >= 0, f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    require(
        q.shape[0] == 0 or max_seqlen_q >= 1,
        f"max_seqlen_q is {max_seqlen_q} but q has {q.shape[0]} tokens",
    )
    require(sliding_window >= 0, f"sliding_window must be >= 0 (0 = none), got {sliding_window}")
    check_same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q
    )


def _check_heads(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, cache_head_dim = k_cache.shape[2], k_cache.shape[3]
    require(
        head_dim == cache_head_dim,
        f"q head_dim {head_dim} differs from the cache's head_dim {cache_head_dim}",
    )
    if not (is_power_of_2(head_dim) and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        raise NotImplementedError(
            f"the Triton attention kernels need a power-of-two head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
            f"got {head_dim}; use the torch path (shardgen.shard.layers.attention) for this model"
        )
    require(
        num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
        f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})",
    )
