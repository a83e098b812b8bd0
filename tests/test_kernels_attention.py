"""Triton paged attention (decode and prefill) against a dense float64 oracle written here.

Runs in the Triton interpreter on CPU (TRITON_INTERPRET=1 in the environment before
Python starts, as `make test` does) or on a CUDA GPU; skipped otherwise. Tests marked
gpu use real sizes and bf16 and run on a GPU only.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from shardgen.shard.kernels.attention import paged_attention  # noqa: E402
from shardgen.shard.kernels.attention_decode import DecodeConfig, choose_num_partitions  # noqa: E402
from shardgen.shard.kernels.attention_prefill import PrefillConfig  # noqa: E402
from kernel_env import DEVICE, gpu_only, needs_kernels  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Step:
    """One step's attention inputs over a randomly paged cache."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int


def make_step(
    cache_lens: list[int],
    q_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    extra_columns: int = 2,
    seed: int = 0,
) -> Step:
    """Random q and cache; sequences get shuffled, disjoint blocks (never block 0).

    Every slot that no sequence position covers (block 0, unused blocks, the tail of a
    last block) holds NaN, so reading one poisons the output.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-(c + n) // block_size) for c, n in zip(cache_lens, q_lens)]
    num_blocks = 1 + sum(needed) + 3
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    width = max(needed, default=0) + extra_columns
    tables, seq_lens = [], []
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for cached, new, count in zip(cache_lens, q_lens, needed):
        blocks, ids = ids[:count], ids[count:]
        seq_len = cached + new
        for pos in range(seq_len):
            block, offset = blocks[pos // block_size], pos % block_size
            k_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
        tables.append(blocks + [0] * (width - count))
        seq_lens.append(seq_len)
    cu = [0]
    for new in q_lens:
        cu.append(cu[-1] + new)
    q = torch.randn(cu[-1], num_q_heads, head_dim, generator=gen).to(dtype)
    return Step(
        q=q.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32).reshape(len(tables), width).to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        max_seqlen_q=max(q_lens, default=0),
    )


def dense_attention(step: Step, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """The contract, one query at a time in float64: gather, mask, softmax, weighted sum."""
    q = step.q.cpu().double()
    num_q_heads = q.shape[1]
    _, block_size, num_kv_heads, head_dim = step.k_cache.shape
    k_rows = step.k_cache.cpu().double().reshape(-1, num_kv_heads, head_dim)
    v_rows = step.v_cache.cpu().double().reshape(-1, num_kv_heads, head_dim)
    tables, seq_lens, cu = step.block_tables.tolist(), step.seq_lens.tolist(), step.cu_seqlens_q.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, seq_len in enumerate(seq_lens):
        slots = [tables[b][p // block_size] * block_size + p % block_size for p in range(seq_len)]
        group = num_q_heads // num_kv_heads
        k = k_rows[slots].repeat_interleave(group, dim=1)  # [seq_len, Hq, D]
        v = v_rows[slots].repeat_interleave(group, dim=1)
        q_len = cu[b + 1] - cu[b]
        for i in range(q_len):
            pos = seq_len - q_len + i
            lo = max(0, pos - sliding_window + 1) if sliding_window > 0 else 0
            if pos < lo:
                continue  # sees nothing: the kernels write zeros
            scores = torch.einsum("hd,lhd->hl", q[cu[b] + i], k[lo : pos + 1]) * scale
            out[cu[b] + i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[lo : pos + 1])
    return out


@pytest.fixture
def nan_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like hand out NaN-filled float tensors: an unwritten element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def check(step: Step, out: torch.Tensor, scale: float, sliding_window: int = 0) -> None:
    assert out.shape == step.q.shape and out.dtype == step.q.dtype
    assert not out.isnan().any(), "an output element was never written or read a poisoned slot"
    want = dense_attention(step, scale, sliding_window)
    tol = TOLERANCE[step.q.dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)


def run(step: Step, scale: float, sliding_window: int = 0, **configs: object) -> torch.Tensor:
    return paged_attention(
        step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens, step.cu_seqlens_q,
        step.max_seqlen_q, scale, sliding_window, **configs,  # type: ignore[arg-type]
    )


SMALL_DECODE = DecodeConfig(block_n=16, num_warps=4, num_stages=1)
SMALL_PREFILL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "partitions"),
    [(2, 2, 32, 16, 1), (4, 2, 32, 32, 3), (8, 2, 16, 16, 4), (8, 1, 64, 32, 2), (6, 2, 32, 16, 5)],
)
def test_decode_matches_oracle(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, partitions: int
) -> None:
    """GQA 1, 2, 4, 8 and 3; ragged contexts that span several tiles and partitions."""
    cache_lens = [70, 0, 33, 129]
    step = make_step(cache_lens, [1] * 4, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    config = DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_partitions=partitions)
    check(step, run(step, 0.3, decode_config=config), 0.3)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("partitions", [1, 4])
def test_decode_sliding_window(partitions: int) -> None:
    step = make_step([100, 5, 47], [1, 1, 1], 8, 2, 32, 16, torch.float32)
    config = DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_partitions=partitions)
    check(step, run(step, 0.2, 20, decode_config=config), 0.2, 20)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
def test_decode_padding_sequences_write_zeros() -> None:
    """A padding row (seq_len 0, as CUDA-graph batches use) attends to nothing -> zeros."""
    step = make_step([40, 0, 17], [1, 1, 1], 4, 2, 32, 16, torch.float16)
    step.seq_lens[1] = 0
    for partitions in (1, 3):
        config = DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_partitions=partitions)
        out = run(step, 0.25, decode_config=config)
        assert torch.all(out[1] == 0)
        check(step, out, 0.25)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
def test_decode_default_config_splits_long_tables() -> None:
    """The automatic split picks several partitions for a small batch with a wide table."""
    step = make_step([600, 260], [1, 1], 4, 2, 32, 16, torch.float32, extra_columns=0)
    width = step.block_tables.shape[1]
    assert choose_num_partitions(2, 2, width * 16, step.q.device) > 1
    check(step, run(step, 0.2), 0.2)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "block_size"),
    [(2, 2, 16), (4, 2, 32), (8, 2, 16), (16, 2, 32), (6, 2, 16)],
)
def test_prefill_matches_oracle(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, block_size: int) -> None:
    """Ragged prompts, cached prefixes, a decode row and a sequence with no new token mixed in."""
    cache_lens = [0, 20, 33, 7, 3]
    q_lens = [19, 5, 1, 0, 26]
    step = make_step(cache_lens, q_lens, num_q_heads, num_kv_heads, 32, block_size, dtype)
    check(step, run(step, 0.3, prefill_config=SMALL_PREFILL), 0.3)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("head_dim", [16, 64])
def test_prefill_default_config(head_dim: int) -> None:
    step = make_step([9, 0], [30, 12], 4, 1, head_dim, 16, torch.float16)
    check(step, run(step, head_dim**-0.5), head_dim**-0.5)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("window", [1, 6, 40])
def test_prefill_sliding_window_with_prefix(window: int) -> None:
    step = make_step([25, 0], [18, 21], 4, 2, 32, 16, torch.float32)
    check(step, run(step, 0.3, window, prefill_config=SMALL_PREFILL), 0.3, window)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
def test_group_wider_than_tile() -> None:
    """32 query heads on one KV head with 16-row tiles: the tile widens to one token of 32 rows."""
    step = make_step([5, 0], [7, 3], 32, 1, 16, 16, torch.float32)
    check(step, run(step, 0.25, prefill_config=SMALL_PREFILL), 0.25)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
def test_single_token_rows_with_an_idle_sequence_are_a_varlen_step() -> None:
    """max_seqlen_q == 1 but T < B (one sequence adds nothing): still exact."""
    step = make_step([12, 30, 4], [1, 0, 1], 4, 2, 32, 16, torch.float16)
    assert step.q.shape[0] == 2 and step.max_seqlen_q == 1
    check(step, run(step, 0.3, prefill_config=SMALL_PREFILL), 0.3)


# Many sequences whose tiles straddle tile boundaries: prompts, chunks after a cached prefix,
# decodes, and padding entries (q_len 0, seq_len 0) between and after the real ones.
MIXED_CACHE_LENS = [0, 5, 0, 30, 12, 0, 3, 0, 7, 0, 40, 0, 0]
MIXED_Q_LENS = [9, 1, 0, 1, 13, 0, 8, 1, 11, 0, 3, 0, 0]


def pad_tokens(step: Step, extra: int) -> None:
    """Appends `extra` rows to q past cu_seqlens_q[-1], as a step padded to a graph's T."""
    padding = torch.randn(extra, *step.q.shape[1:], generator=torch.Generator().manual_seed(1)).to(step.q)
    step.q = torch.cat([step.q, padding])


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize(("dtype", "num_q_heads", "num_kv_heads"), [(torch.float32, 4, 2), (torch.float16, 6, 2)])
def test_prefill_mixed_batch_with_padding_sequences(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int) -> None:
    step = make_step(MIXED_CACHE_LENS, MIXED_Q_LENS, num_q_heads, num_kv_heads, 32, 16, dtype)
    assert step.seq_lens.tolist()[-2:] == [0, 0]
    check(step, run(step, 0.3, prefill_config=SMALL_PREFILL), 0.3)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize(("dtype", "extra"), [(torch.float32, 3), (torch.float16, 21)])
def test_prefill_rows_past_the_last_sequence_come_out_as_zeros(dtype: torch.dtype, extra: int) -> None:
    """T > cu_seqlens_q[-1]: less than a tile and several tiles of trailing padding rows."""
    step = make_step(MIXED_CACHE_LENS, MIXED_Q_LENS, 4, 2, 32, 16, dtype)
    real = step.q.shape[0]
    pad_tokens(step, extra)
    out = run(step, 0.3, prefill_config=SMALL_PREFILL)
    assert torch.all(out[real:] == 0)
    check(step, out, 0.3)  # the oracle leaves rows past cu_seqlens_q[-1] at zero


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize(
    ("dtype", "num_q_heads", "num_kv_heads", "window"),
    [(torch.float32, 4, 2, 0), (torch.float16, 6, 2, 9), (torch.float32, 2, 2, 0), (torch.float16, 32, 1, 0)],
)
def test_one_token_sequences_of_a_varlen_step(
        dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, window: int) -> None:
    """One-token sequences in a varlen step (the decode kernel's varlen launch): running rows
    ahead of the prompts, a one-token chunk after a cached prefix between them, one that
    is the whole prompt, padding sequences and rows past the last sequence; groups of 2,
    3 (rows masked in the tile), 1 and 32 query heads."""
    cache_lens = [37, 0, 16, 70, 0, 0, 25, 3, 0]
    q_lens = [1, 1, 1, 9, 1, 0, 1, 14, 0]
    step = make_step(cache_lens, q_lens, num_q_heads, num_kv_heads, 32, 16, dtype)
    real = step.q.shape[0]
    pad_tokens(step, 4)
    out = run(step, 0.3, window, prefill_config=SMALL_PREFILL)
    assert torch.all(out[real:] == 0)
    check(step, out, 0.3, window)


@needs_kernels
@pytest.mark.parametrize(("dtype", "window", "partitions"), [(torch.float32, 0, 1), (torch.float16, 6, 3)])
def test_a_varlen_step_divides_its_rows_between_the_two_kernels(
        dtype: torch.dtype, window: int, partitions: int) -> None:
    """The decode launch with cu_seqlens_q writes exactly the rows of one-token sequences
    (running rows, a one-token chunk after a prefix), the prefill launch writes every
    other row (prompts, chunks, zeros past the last sequence): each leaves the
    other's rows untouched, and together they are exact."""
    from shardgen.shard.kernels.attention_decode import launch_decode
    from shardgen.shard.kernels.attention_prefill import launch_prefill

    step = make_step(MIXED_CACHE_LENS, MIXED_Q_LENS, 4, 2, 32, 16, dtype)
    real = step.q.shape[0]
    pad_tokens(step, 5)
    cu = step.cu_seqlens_q.tolist()
    single = torch.zeros(step.q.shape[0], dtype=torch.bool)
    for b, q_len in enumerate(MIXED_Q_LENS):
        single[cu[b]] = q_len == 1
    assert 0 < int(single.sum()) < real
    args = (step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens)
    decode_cfg = DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_partitions=partitions)

    out = torch.full_like(step.q, float("nan"))
    launch_decode(*args, 0.3, window, out, decode_cfg, cu_seqlens_q=step.cu_seqlens_q)
    assert not out[single].isnan().any() and out[~single].isnan().all()

    out = torch.full_like(step.q, float("nan"))
    launch_prefill(*args, step.cu_seqlens_q, 0.3, window, out, SMALL_PREFILL)
    assert out[single].isnan().all() and not out[~single].isnan().any()

    launch_decode(*args, 0.3, window, out, decode_cfg, cu_seqlens_q=step.cu_seqlens_q)
    assert torch.equal(out, run(step, 0.3, window, decode_config=decode_cfg, prefill_config=SMALL_PREFILL))
    assert torch.all(out[real:] == 0)
    check(step, out, 0.3, window)


@needs_kernels
def test_prefill_ignores_the_max_seqlen_q_bound() -> None:
    """A graph replay passes its bucket's bound, not the step's longest query: same output."""
    step = make_step([0, 12, 0, 3], [10, 1, 0, 6], 4, 2, 32, 16, torch.float32)
    pad_tokens(step, 5)
    exact = run(step, 0.3, 4, prefill_config=SMALL_PREFILL)
    step.max_seqlen_q = step.q.shape[0] + 100
    assert torch.equal(run(step, 0.3, 4, prefill_config=SMALL_PREFILL), exact)
    check(step, exact, 0.3, 4)


@needs_kernels
def test_strided_q_view_of_fused_qkv() -> None:
    """q sliced out of a fused [T, (Hq + 2 Hkv) * D] projection needs no copy."""
    step = make_step([3, 10], [6, 1], 4, 2, 32, 16, torch.float32)
    qkv = torch.randn(7, (4 + 4) * 32, device=DEVICE)
    qkv[:, : 4 * 32] = step.q.reshape(7, -1)
    step.q = qkv[:, : 4 * 32].view(7, 4, 32)
    assert not step.q.is_contiguous()
    check(step, run(step, 0.3, prefill_config=SMALL_PREFILL), 0.3)
    decode = make_step([50, 9], [1, 1], 4, 2, 32, 16, torch.float32)
    fused = torch.zeros(2, 4, 64, device=DEVICE)
    fused[:, :, :32] = decode.q
    decode.q = fused[:, :, :32]
    check(decode, run(decode, 0.3, decode_config=SMALL_DECODE), 0.3)


@needs_kernels
def test_empty_step() -> None:
    step = make_step([4], [0], 2, 1, 16, 16, torch.float32)
    assert run(step, 1.0).shape == (0, 2, 16)


def _bad(step: Step, **changes: object) -> dict[str, object]:
    args: dict[str, object] = dict(
        q=step.q, k_cache=step.k_cache, v_cache=step.v_cache, block_tables=step.block_tables,
        seq_lens=step.seq_lens, cu_seqlens_q=step.cu_seqlens_q, max_seqlen_q=step.max_seqlen_q, scale=1.0,
    )
    args.update(changes)
    return args


def test_rejects_bad_arguments() -> None:
    step = make_step([4, 2], [2, 1], 4, 2, 32, 16, torch.float32)
    cases = [
        (dict(block_tables=step.block_tables.long()), "block_tables must be torch.int32"),
        (dict(seq_lens=step.seq_lens[:1]), "batch mismatch"),
        (dict(q=step.q.half()), "must both be q's dtype or float8_e4m3fn"),
        (dict(q=step.q[:, :3]), "multiple of KV heads"),
        (dict(v_cache=step.v_cache[:-1]), "differs from k_cache"),
        (dict(k_cache=step.k_cache.transpose(0, 1).contiguous().transpose(0, 1)), "k_cache must be contiguous"),
        (dict(q=step.q[0]), r"\[T, Hq, D\]"),
        (dict(max_seqlen_q=0), "max_seqlen_q"),
        (dict(sliding_window=-1), "sliding_window"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            paged_attention(**_bad(step, **changes))  # type: ignore[arg-type]


def test_rejects_bad_launch_configs() -> None:
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 8"):
        DecodeConfig(block_n=8)
    with pytest.raises(ValueError, match="num_partitions must be None or in \\[1, 64\\], got 0"):
        DecodeConfig(num_partitions=0)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 48"):
        PrefillConfig(block_m=48)


def test_rejects_unsupported_head_dim() -> None:
    step = make_step([4], [2], 2, 1, 48, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="head_dim in \\[16, 256\\], got 48"):
        paged_attention(**_bad(step))  # type: ignore[arg-type]


# ---------------------------------------------------------------- GPU, real sizes, bf16


@gpu_only
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (32, 32, 128), (16, 2, 64), (8, 1, 256)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_real_sizes(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    step = make_step([4000, 17, 1023, 2500, 1], [1] * 5, num_q_heads, num_kv_heads, head_dim, 16, dtype)
    check(step, run(step, head_dim**-0.5), head_dim**-0.5)
    check(step, run(step, head_dim**-0.5, 1024), head_dim**-0.5, 1024)


@gpu_only
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (28, 4, 128), (16, 2, 64), (8, 1, 256)]
)
def test_gpu_prefill_real_sizes(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    step = make_step([0, 1500, 64, 0], [700, 300, 1, 129], num_q_heads, num_kv_heads, head_dim, 16, torch.bfloat16)
    check(step, run(step, head_dim**-0.5), head_dim**-0.5)
    check(step, run(step, head_dim**-0.5, 256), head_dim**-0.5, 256)


def replay_in_graph(step: Step, seq_lens: list[int], q_lens: list[int]) -> torch.Tensor:
    """Captures the step's attention in a CUDA graph under other lengths of the same shapes
    (T, B), puts the step's own lengths back and replays: the replay's output."""
    replayed_seq_lens, replayed_cu = step.seq_lens.clone(), step.cu_seqlens_q.clone()
    step.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    step.cu_seqlens_q.copy_(torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32))
    step.max_seqlen_q = max(q_lens)
    run(step, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(step, 0.1)
    step.seq_lens.copy_(replayed_seq_lens)
    step.cu_seqlens_q.copy_(replayed_cu)
    graph.replay()
    return out


@gpu_only
def test_gpu_prefill_in_cuda_graph() -> None:
    """A prefill launch captured under one step's lengths (and a max_seqlen_q below the
    replayed one's) replays exactly for another step of the same shapes (T, B): a padding
    sequence, a chunk after a long prefix, and rows past the last sequence."""
    step = make_step([700, 0, 2], [9, 0, 230], 32, 8, 128, 16, torch.bfloat16)
    pad_tokens(step, 17)
    assert step.q.shape[0] == 256
    check(step, replay_in_graph(step, seq_lens=[200, 41, 350], q_lens=[200, 1, 50]), 0.1)


@gpu_only
def test_gpu_decode_in_cuda_graph() -> None:
    """A decode launch captures (no host sync) and replays with new sequence lengths."""
    step = make_step([300, 904, 32], [1, 1, 1], 32, 8, 128, 16, torch.bfloat16, extra_columns=8)
    check(step, replay_in_graph(step, seq_lens=[301, 901, 41], q_lens=[1, 1, 1]), 0.1)


@gpu_only
@pytest.mark.parametrize("batch", [12, 40])
def test_gpu_varlen_graph_replays_another_division_of_rows(batch: int) -> None:
    """A mixed step captured with some one-token sequences replays exactly for a step of the
    same (T, B) whose one-token sequences are others: which kernel takes which rows is
    decided on the device, at every replay (a batch of 12 splits the decode launch over
    the sequence, one of 40 does not)."""
    captured_q = [1] * (batch - 2) + [150, 60]
    replayed_q = [40, 0] + [1] * (batch - 4) + [170, 0]
    captured_ctx = [900] * (batch - 2) + [0, 1100]  # within the replayed tables' width
    replayed_ctx = [1200, 0] + [300 + 37 * b for b in range(batch - 4)] + [800, 0]
    step = make_step(replayed_ctx, replayed_q, 32, 8, 128, 16, torch.bfloat16, extra_columns=8)
    pad_tokens(step, sum(captured_q) - sum(replayed_q))
    captured_seq_lens = [c + n for c, n in zip(captured_ctx, captured_q)]
    check(step, replay_in_graph(step, captured_seq_lens, captured_q), 0.1)
