"""quantize_rows_fp8 (Triton) against the torch reference of shard/layers/quant.py, and the
fp8 projection it feeds, in the interpreter on CPU or on a CUDA GPU.

The interpreter (3.9) rounds into fp8 wrongly where rounding carries into the exponent
(see test_kernels_fp8_cache.py), so on CPU each row is built to quantize exactly: its
largest magnitude is 448 * 2^j and every value an fp8 value times 2^j. The GPU checks
arbitrary values, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEVICE, INTERPRETING, gpu_only, needs_kernels  # noqa: E402

from shardgen.shard.distributed import TensorParallelGroup  # noqa: E402
from shardgen.shard.kernels import activation as k_activation  # noqa: E402
from shardgen.shard.kernels import norm as k_norm  # noqa: E402
from shardgen.shard.kernels import quant as k_quant  # noqa: E402
from shardgen.shard.layers import activation as torch_activation  # noqa: E402
from shardgen.shard.layers import norm as torch_norm  # noqa: E402
from shardgen.shard.layers import quant  # noqa: E402
from shardgen.shard.layers.linear import ColumnParallelLinear  # noqa: E402

pytestmark = needs_kernels


def exactly_quantizable(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows whose quantization rounds nothing: fp8 values times 2^j, each row's peak 448 * 2^j."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, k, generator=gen) * 100).clamp(-400, 400).to(quant.FP8_DTYPE).float()
    values[:, k // 2] = quant.FP8_MAX * torch.sign(torch.randn(rows, generator=gen) + 0.5)
    powers = 2.0 ** (torch.arange(rows) - rows // 2).float()
    return (values * powers[:, None]).to(dtype)


def check_equal(x: torch.Tensor) -> None:
    got, got_scale = k_quant.quantize_rows_fp8(x)
    want, want_scale = quant.quantize_rows_fp8(x.cpu())
    assert got.dtype == quant.FP8_DTYPE and got.is_contiguous() and got_scale.shape == (x.shape[0], 1)
    assert torch.equal(got.cpu().float(), want.float())
    assert torch.equal(got_scale.cpu(), want_scale)


@pytest.mark.parametrize("k", [8, 100, 4096, 20000])   # one pass up to 16384 elements, two above
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_quantize_like_the_reference(k: int, dtype: torch.dtype) -> None:
    check_equal(exactly_quantizable(6, k, dtype, seed=k).to(DEVICE))


def test_strided_rows_zero_rows_and_no_rows() -> None:
    wide = exactly_quantizable(5, 96, torch.float32, seed=1).to(DEVICE)
    wide[2] = 0.0
    check_equal(wide[:, 16:80])   # rows 96 apart, 64 long
    empty, scale = k_quant.quantize_rows_fp8(wide[:0])
    assert empty.shape == (0, 96) and scale.shape == (0, 1)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        k_quant.quantize_rows_fp8(torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        k_quant.quantize_rows_fp8(torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))


@gpu_only
@pytest.mark.parametrize("k", [4096, 14336, 20000])
def test_gpu_rounds_arbitrary_values_like_the_reference(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(300, k, generator=gen) * torch.logspace(-4, 3, 300)[:, None]
    x[7] = 0.0
    check_equal(x.to(torch.bfloat16).cuda())
    check_equal(x.cuda())


@gpu_only
@pytest.mark.parametrize("rows", [1, 16, 256, 3000])
def test_gpu_fp8_projection_in_a_graph_is_near_the_float32_contract(rows: int) -> None:
    torch.manual_seed(rows)
    layer = ColumnParallelLinear(4096, 6144, False, TensorParallelGroup(0, 1, None)).cuda().bfloat16()
    torch.nn.init.normal_(layer.weight, std=0.02)
    layer.quantize_fp8(k_quant.quantize_rows_fp8)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    x_q, x_scale = quant.quantize_rows_fp8(x)
    want = (x_q.float() * x_scale) @ (layer.weight.float() * layer.weight_scale.T).T
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # bf16 output (2^-8 relative) over Hopper's fast fp8 accumulation.
    torch.testing.assert_close(eager.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("inter", [8, 100, 4096, 20000])   # one pass up to 16384 columns, two above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_fp8_is_silu_and_mul_then_quantize(inter: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(5, 2 * inter, generator=gen) * 3).to(dtype).to(DEVICE)
    fused = k_activation.silu_and_mul_fp8(x)
    unfused = k_quant.quantize_rows_fp8(k_activation.silu_and_mul(x))
    assert fused.values.shape == (5, inter) and fused.values.dtype == quant.FP8_DTYPE
    assert torch.equal(fused.values.float(), unfused.values.float())
    assert torch.equal(fused.scale, unfused.scale)
    if not INTERPRETING:   # and near the torch ops (Triton's exp may differ from torch's by an ulp)
        want = torch_activation.silu_and_mul_fp8(x.cpu())
        torch.testing.assert_close(fused.scale.cpu(), want.scale)
        step = want.values.float().abs() / 8 + 2**-9   # one e4m3 step
        assert ((fused.values.cpu().float() - want.values.float()).abs() <= step).all()


@pytest.mark.parametrize("hidden", [64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_is_the_norm_then_quantize(hidden: int, dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(2, 7, hidden, generator=gen) * 2).to(dtype).to(DEVICE).unbind(0)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(dtype).to(DEVICE)
    if with_residual:
        fused, summed = k_norm.fused_add_rms_norm_fp8(x, residual, weight, 1e-5)
        normed, want_summed = k_norm.fused_add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(summed, want_summed)
        reference, _ = torch_norm.fused_add_rms_norm_fp8(x.cpu(), residual.cpu(), weight.cpu(), 1e-5)
    else:
        fused = k_norm.rms_norm_fp8(x, weight, 1e-5)
        normed = k_norm.rms_norm(x, weight, 1e-5)
        reference = torch_norm.rms_norm_fp8(x.cpu(), weight.cpu(), 1e-5)
    unfused = k_quant.quantize_rows_fp8(normed)
    if dtype == torch.float32 and not INTERPRETING:
        # In fp32 nothing rounds the normed rows to a coarser dtype, and the two kernels are
        # compiled apart: the sum of squares may contract into FMAs differently (1 ulp).
        torch.testing.assert_close(fused.scale, unfused.scale, rtol=2**-21, atol=0)
        step = unfused.values.float().abs() / 8 + 2**-9
        assert ((fused.values.float() - unfused.values.float()).abs() <= step).all()
    else:
        assert torch.equal(fused.values.float(), unfused.values.float())
        assert torch.equal(fused.scale, unfused.scale)
    if not INTERPRETING:   # and near the torch ops (rsqrt may differ by an ulp)
        torch.testing.assert_close(fused.scale.cpu(), reference.scale)
        step = reference.values.float().abs() / 8 + 2**-9
        assert ((fused.values.cpu().float() - reference.values.float()).abs() <= step).all()
