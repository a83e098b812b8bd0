"""An fp8 e4m3 KV cache (`--kv-cache-dtype fp8`): the Triton writes store what the torch
path stores (saturated at +-448), and the Triton attention reads the fp8 keys and values
exactly (checked against the float64 oracle on the same fp8 values), as does the torch
path the CPU runs.

Runs in the Triton interpreter on CPU or on a CUDA GPU, like test_kernels_attention.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEVICE, gpu_only, needs_kernels  # noqa: E402
from test_kernels_attention import SMALL_PREFILL, Step, check, make_step, run  # noqa: E402

from shardgen.shard.kernels.attention_decode import DecodeConfig  # noqa: E402
from shardgen.shard.kernels.kv_cache import write_kv  # noqa: E402
from shardgen.shard.kernels.rotary import apply_rotary, rotary_and_write_kv  # noqa: E402
from shardgen.shard.layers import attention as torch_attention  # noqa: E402

FP8 = torch.float8_e4m3fn


def as_fp8_cache(step: Step) -> Step:
    """The same step over caches rounded to fp8 (NaN in unused slots stays NaN)."""
    return Step(step.q, step.k_cache.to(FP8), step.v_cache.to(FP8), step.block_tables, step.seq_lens,
                step.cu_seqlens_q, step.max_seqlen_q)


def rows_with_outliers(tokens: int, heads: int, dim: int, dtype: torch.dtype, seed: int,
                       representable: bool = True) -> torch.Tensor:
    """Keys or values over fp8's range, a few beyond +-448 (they saturate). Representable:
    every other value is an fp8 value already, so storing it rounds nothing. The Triton
    interpreter (3.9) rounds into fp8 wrongly where rounding carries into the exponent
    (31.5 -> 16, not 32); the GPU's conversion does not, so rounding is checked there."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(tokens, heads, dim, generator=gen) * 40
    if representable:
        rows = rows.to(FP8).float()
    rows[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, -460.0])
    return rows.to(dtype).to(DEVICE)


def assert_same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == FP8 and want.dtype == FP8
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=0, rtol=0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("partitions", [1, 3])
def test_decode_reads_an_fp8_cache(dtype: torch.dtype, partitions: int) -> None:
    step = as_fp8_cache(make_step([70, 0, 33, 129], [1] * 4, 8, 2, 32, 16, dtype))
    config = DecodeConfig(block_n=16, num_warps=4, num_stages=1, num_partitions=partitions)
    check(step, run(step, 0.3, decode_config=config), 0.3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_and_mixed_steps_read_an_fp8_cache(dtype: torch.dtype) -> None:
    """Chunks after a cached prefix, a fresh prompt and a decode row in one step."""
    step = as_fp8_cache(make_step([40, 0, 57], [23, 17, 1], 8, 2, 32, 16, dtype))
    check(step, run(step, 0.25, prefill_config=SMALL_PREFILL), 0.25)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [23, 17, 1]])
def test_the_torch_path_reads_an_fp8_cache_as_its_values(q_lens: list[int]) -> None:
    """The CPU path on an fp8 cache equals the same path on an fp32 cache of those values."""
    step = make_step([40, 5, 57], q_lens, 8, 2, 32, 16, torch.float32)
    fp8 = as_fp8_cache(step)
    dequantized = Step(step.q, fp8.k_cache.float(), fp8.v_cache.float(), step.block_tables, step.seq_lens,
                       step.cu_seqlens_q, step.max_seqlen_q)
    args = (step.block_tables.cpu(), step.seq_lens.cpu(), step.cu_seqlens_q.cpu(), step.max_seqlen_q, 0.3)
    got = torch_attention.paged_attention(fp8.q.cpu(), fp8.k_cache.cpu(), fp8.v_cache.cpu(), *args)
    want = torch_attention.paged_attention(step.q.cpu(), dequantized.k_cache.cpu(), dequantized.v_cache.cpu(), *args)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def check_write_kv(dtype: torch.dtype, representable: bool) -> None:
    tokens, heads, dim = 6, 2, 32
    key = rows_with_outliers(tokens, heads, dim, dtype, 1, representable)
    value = rows_with_outliers(tokens, heads, dim, dtype, 2, representable)
    slots = torch.tensor([3, 17, -1, 0, 30, 8], dtype=torch.int64, device=DEVICE)
    k_cache = torch.zeros(4, 8, heads, dim, dtype=FP8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    kept = slots >= 0
    want_k, want_v = _torch_written(key[kept], value[kept], slots[kept], k_cache.shape)
    write_kv(key, value, k_cache, v_cache, slots)
    assert_same_fp8(k_cache, want_k)
    assert_same_fp8(v_cache, want_v)
    assert k_cache.float().abs().max() == 448.0


def check_rotary_and_write_kv(representable: bool) -> None:
    """Quarter turns (cos, sin in {0, +-1}) keep representable keys representable."""
    tokens, q_heads, kv_heads, dim = 5, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(tokens, q_heads, dim, generator=gen).to(DEVICE)
    k = rows_with_outliers(tokens, kv_heads, dim, torch.float32, 4, representable)
    v = rows_with_outliers(tokens, kv_heads, dim, torch.float32, 5, representable)
    turns = torch.randint(0, 4, (tokens, dim // 2), generator=gen) * (torch.pi / 2)
    angles = turns if representable else torch.rand(tokens, dim // 2, generator=gen) * 6
    cos, sin = angles.cos().round(decimals=6).to(DEVICE), angles.sin().round(decimals=6).to(DEVICE)
    slots = torch.tensor([9, 2, -1, 31, 16], dtype=torch.int64, device=DEVICE)
    k_cache = torch.zeros(4, 8, kv_heads, dim, dtype=FP8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q_ref, k_ref = apply_rotary(q.clone(), k.clone(), cos, sin)
    kept = slots >= 0
    want_k, want_v = _torch_written(k_ref[kept], v[kept], slots[kept], k_cache.shape)
    rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, q_ref)
    assert_same_fp8(k_cache, want_k)
    assert_same_fp8(v_cache, want_v)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_into_fp8_stores_what_the_torch_path_does(dtype: torch.dtype) -> None:
    """Saturated at +-448; padding slots (-1) left alone."""
    check_write_kv(dtype, representable=True)


@needs_kernels
def test_rotary_and_write_kv_into_fp8_stores_the_rotated_keys_cast() -> None:
    check_rotary_and_write_kv(representable=True)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_writes_round_as_the_torch_path_does_on_the_gpu(dtype: torch.dtype) -> None:
    check_write_kv(dtype, representable=False)
    check_rotary_and_write_kv(representable=False)


def _torch_written(key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                   shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh zero fp8 caches after the torch path's write_kv (the CPU production path)."""
    k_cache = torch.zeros(shape, dtype=FP8)
    v_cache = torch.zeros(shape, dtype=FP8)
    torch_attention.write_kv(key.cpu(), value.cpu(), k_cache, v_cache, slots.cpu())
    return k_cache, v_cache


@gpu_only
@pytest.mark.parametrize("q_lens", [[1] * 64, [300, 1, 7, 1]])
def test_bf16_attention_over_an_fp8_cache_at_llama_sizes(q_lens: list[int]) -> None:
    """32 query heads over 8 KV heads of 128 dims, default launch configs."""
    step = as_fp8_cache(make_step([900] * len(q_lens), q_lens, 32, 8, 128, 16, torch.bfloat16))
    check(step, run(step, 128**-0.5), 128**-0.5)
