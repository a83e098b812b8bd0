"""The small-batch linear kernel against F.linear, and the layers' choice between them.

Runs in the Triton interpreter on CPU (TRITON_INTERPRET=1 set before Python starts, as
`make test` does) or on a CUDA GPU. The interpreter's bf16 tl.dot is wrong, so CPU tests
use fp32 and fp16; tests marked gpu use real sizes and bf16, GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from shardgen.shard.distributed import TensorParallelGroup  # noqa: E402
from shardgen.shard.kernels.linear import (  # noqa: E402
    DEFAULT_CONFIG,
    FP8_CONFIG,
    LinearConfig,
    choose_split_k,
    default_linear_config,
    linear,
    linear_fp8,
)
from shardgen.shard.layers.linear import (  # noqa: E402
    SMALL_BATCH_MAX_ROWS,
    QKVParallelLinear,
    RowParallelLinear,
    small_batch_linear_for,
)
from shardgen.shard.layers.ops import TORCH_OPS, triton_ops  # noqa: E402
from shardgen.shard.layers.quant import fp8_linear, quantize_rows_fp8, quantize_weight_fp8  # noqa: E402
from kernel_env import DEVICE, gpu_only, needs_kernels  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# Forced configs: each kind of multiply, unsplit and with K split over programs.
CONFIGS = {
    "default": None,
    "broadcast": LinearConfig(block_n=8, block_k=32, use_dot=False, split_k=1),
    "broadcast-split3": LinearConfig(block_n=16, block_k=32, use_dot=False, split_k=3),
    "dot": LinearConfig(block_n=16, block_k=32, use_dot=True, split_k=1),
    "dot-split4": LinearConfig(block_n=32, block_k=16, use_dot=True, split_k=4),
}


@pytest.fixture
def nan_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty hands out NaN-filled float tensors: an output element never written shows."""
    real_empty = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32 on the same (rounded) inputs, rounded once to x's dtype."""
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def assert_matches(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    want = reference(x, weight, bias)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert not got.isnan().any()
    # fp32 accumulation in another order: fp32 differs in the last bits; fp16 by one rounding.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    torch.testing.assert_close(got, want, atol=tol * x.shape[1] ** 0.5, rtol=tol)


@needs_kernels
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "with_bias"), [(1, True), (3, False), (16, True)], ids=["1-bias", "3", "16-bias"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_linear_matches_f_linear(dtype: torch.dtype, rows: int, with_bias: bool, config: LinearConfig | None) -> None:
    """N = 70 and K = 200 are multiples of no block size: the last column tile and K tile are partial."""
    n, k = 70, 200
    x = randn(rows, k, dtype=dtype, seed=1)
    weight = randn(n, k, dtype=dtype, seed=2) / k**0.5
    bias = randn(n, dtype=dtype, seed=3) if with_bias else None
    assert_matches(linear(x, weight, bias, config), x, weight, bias)


@needs_kernels
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("config", [CONFIGS["broadcast-split3"], CONFIGS["dot-split4"]], ids=["broadcast", "dot"])
def test_odd_k_and_strided_rows(config: LinearConfig) -> None:
    """K = 77 (rows of W not 16-byte aligned) and x a column slice of a wider tensor."""
    n, k = 33, 77
    wide = randn(3, k + 5, dtype=torch.float16, seed=4)
    x = wide[:, 2:2 + k]
    weight = randn(n, k, dtype=torch.float16, seed=5) / k**0.5
    bias = randn(n, dtype=torch.float16, seed=6)
    assert_matches(linear(x, weight, bias, config), x, weight, bias)


@needs_kernels
@pytest.mark.usefixtures("nan_outputs")
def test_more_rows_than_one_program_takes() -> None:
    """70 rows: two row blocks of 64 on the tensor cores, each streaming W."""
    x = randn(70, 48, dtype=torch.float32, seed=7)
    weight = randn(40, 48, dtype=torch.float32, seed=8)
    assert_matches(linear(x, weight, None, LinearConfig(block_n=16, block_k=16, split_k=2)), x, weight, None)


@needs_kernels
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("block_m", [16, 128], ids=["three-row-blocks", "one-row-block"])
def test_the_config_sets_the_rows_a_program_takes(block_m: int) -> None:
    """40 rows in row blocks of 16 (the last one ragged) or in one block of 64 (block_m
    capped at the rows' power of two)."""
    x = randn(40, 64, dtype=torch.float32, seed=9)
    weight = randn(48, 64, dtype=torch.float32, seed=10)
    config = LinearConfig(block_n=16, block_k=32, split_k=1, block_m=block_m)
    assert_matches(linear(x, weight, None, config), x, weight, None)


@needs_kernels
def test_empty_inputs() -> None:
    weight = randn(5, 8, dtype=torch.float32, seed=9)
    assert linear(randn(0, 8, dtype=torch.float32, seed=1), weight).shape == (0, 5)
    bias = randn(5, dtype=torch.float32, seed=2)
    no_k = linear(randn(2, 0, dtype=torch.float32, seed=1), randn(5, 0, dtype=torch.float32, seed=1), bias)
    assert torch.equal(no_k, bias.expand(2, 5))


@needs_kernels
@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "message"),
    [
        ((2, 8), (5, 9), torch.float32, r"K=8, weight \[N, K\] is \(5, 9\)"),
        ((2, 8, 1), (5, 8), torch.float32, r"x must be \[M, K\]"),
        ((2, 8), (5, 8), torch.int32, "must be float16, bfloat16 or float32"),
    ],
)
def test_bad_arguments_are_named(x_shape: tuple, w_shape: tuple, dtype: torch.dtype, message: str) -> None:
    x = torch.zeros(x_shape, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        linear(x, torch.zeros(w_shape, dtype=dtype, device=DEVICE))


@needs_kernels
def test_weight_and_bias_must_match_x() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight is torch.float16, x is torch.float32"):
        linear(x, torch.zeros(5, 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must be a contiguous \[5\] torch.float32 tensor, got \(4,\)"):
        linear(x, torch.zeros(5, 8, device=DEVICE), torch.zeros(4, device=DEVICE))


def test_configs_are_validated() -> None:
    with pytest.raises(ValueError, match="split_k must be None or in"):
        LinearConfig(block_n=16, block_k=64, split_k=0)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 8"):
        LinearConfig(block_n=8, block_k=64, use_dot=True)
    assert LinearConfig(block_n=8, block_k=64, use_dot=False).block_n == 8  # the FMA path takes narrow tiles
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 8"):
        LinearConfig(block_n=16, block_k=64, block_m=8)


def test_k_is_split_only_when_the_tiles_leave_most_sms_idle() -> None:
    """Off CUDA the SM count is a stand-in of 4: a split aims for 2 programs."""
    cpu = torch.device("cpu")
    assert choose_split_k(n_tiles=1, k=4096, block_k=256, device=cpu) == 2
    assert choose_split_k(n_tiles=2, k=4096, block_k=256, device=cpu) == 1
    assert choose_split_k(n_tiles=1, k=1000, block_k=256, device=cpu) == 1  # no split under 512


def test_the_config_table_picks_by_shape() -> None:
    assert not default_linear_config(1, 28672, 4096).use_dot
    assert default_linear_config(4, 28672, 4096) == DEFAULT_CONFIG
    assert default_linear_config(1, 4096, 14336).num_stages == 5
    assert default_linear_config(1, 4096, 4096) == DEFAULT_CONFIG
    assert default_linear_config(1, 28672, 4096, fp8=True).num_stages == 4
    assert default_linear_config(32, 4096, 14336, fp8=True) == FP8_CONFIG


# ------------------------------------------------------------------------------ layers


def test_the_kernel_is_chosen_for_cuda_float_weights_only() -> None:
    ops = triton_ops()
    cuda = torch.device("cuda", 0)
    assert small_batch_linear_for(ops, cuda, torch.bfloat16) is ops.small_batch_linear is linear
    assert small_batch_linear_for(ops, cuda, torch.float8_e4m3fn) is F.linear
    assert small_batch_linear_for(ops, torch.device("cpu"), torch.float16) is F.linear
    assert small_batch_linear_for(TORCH_OPS, cuda, torch.bfloat16) is F.linear


@pytest.mark.parametrize("ops", [TORCH_OPS, triton_ops()], ids=["torch", "triton"])
def test_layers_on_cpu_run_exactly_f_linear(ops: object) -> None:
    tp = TensorParallelGroup()
    layer = QKVParallelLinear(32, head_dim=8, num_heads=4, num_kv_heads=2, bias=True, tp=tp, ops=ops)  # type: ignore[arg-type]
    assert layer._small_batch_linear is F.linear
    for param in layer.parameters():
        param.data.copy_(torch.randn(param.shape))
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("rows", [1, SMALL_BATCH_MAX_ROWS, SMALL_BATCH_MAX_ROWS + 1])
def test_the_row_count_picks_the_linear(rows: int) -> None:
    """Up to SMALL_BATCH_MAX_ROWS rows the layer calls its small-batch linear; above, F.linear."""
    layer = RowParallelLinear(16, 8, bias=False, tp=TensorParallelGroup())
    calls: list[int] = []

    def recording_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, weight, bias)

    layer._small_batch_linear = recording_linear
    layer(torch.zeros(rows, 16))
    assert calls == ([rows] if rows <= SMALL_BATCH_MAX_ROWS else [])


# ------------------------------------------------------------------------------ GPU, real sizes

LLAMA_8B_PROJECTIONS = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@gpu_only
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("projection", LLAMA_8B_PROJECTIONS)
def test_llama_8b_projections_in_bf16(projection: str, rows: int) -> None:
    n, k = LLAMA_8B_PROJECTIONS[projection]
    x = randn(rows, k, dtype=torch.bfloat16, seed=1)
    weight = randn(n, k, dtype=torch.bfloat16, seed=2) / k**0.5
    bias = randn(n, dtype=torch.bfloat16, seed=3)
    assert_matches(linear(x, weight, bias), x, weight, bias)


@gpu_only
@pytest.mark.parametrize("k", [4096, 14336], ids=["default-config", "long-k-config"])
@pytest.mark.parametrize("rows", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_pipeline_fits_in_shared_memory(dtype: torch.dtype, rows: int, k: int) -> None:
    """More rows of x, or 4-byte elements, take fewer pipeline stages instead of failing to launch."""
    x = randn(rows, k, dtype=dtype, seed=1)
    weight = randn(256, k, dtype=dtype, seed=2) / k**0.5
    assert_matches(linear(x, weight), x, weight, None)


@gpu_only
@pytest.mark.parametrize("config", [None, LinearConfig(block_n=64, block_k=128, split_k=8)], ids=["default", "split8"])
def test_repeated_calls_give_the_same_bits(config: LinearConfig | None) -> None:
    """No atomics: split-K partials are summed in a fixed order, so greedy decoding is reproducible."""
    x = randn(4, 4096, dtype=torch.bfloat16, seed=1)
    weight = randn(4096, 4096, dtype=torch.bfloat16, seed=2)
    first = linear(x, weight, None, config)
    for _ in range(20):
        assert torch.equal(linear(x, weight, None, config), first)


@gpu_only
def test_a_cuda_layer_built_with_triton_ops_uses_the_kernel() -> None:
    with torch.device("cuda"):
        layer = RowParallelLinear(256, 128, bias=True, tp=TensorParallelGroup(), ops=triton_ops())
    assert layer._small_batch_linear is linear
    for param in layer.parameters():
        param.data.copy_(torch.randn(param.shape))
    x = torch.randn(SMALL_BATCH_MAX_ROWS, 256, device="cuda")
    assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))


FP8_CASES = {   # (rows, N, K, config): each kind of multiply, split and unsplit, ragged edges
    "default": (1, 64, 512, None),
    "dot": (16, 48, 64, LinearConfig(block_n=16, block_k=32)),
    "dot-ragged": (5, 40, 96, LinearConfig(block_n=16, block_k=64)),
    "dot-split2": (3, 32, 128, LinearConfig(block_n=16, block_k=32, split_k=2)),
    "broadcast": (4, 40, 64, LinearConfig(block_n=8, block_k=32, use_dot=False, split_k=1)),
}


@pytest.mark.parametrize("case", sorted(FP8_CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_fp8_computes_the_scaled_product(case: str, with_bias: bool) -> None:
    rows, n, k, config = FP8_CASES[case]
    gen = torch.Generator().manual_seed(rows * n + k)
    x, weight = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen) / 10
    (x_q, x_scale), (w_q, w_scale) = quantize_rows_fp8(x), quantize_weight_fp8(weight)
    bias = torch.randn(n, generator=gen) if with_bias else None
    want = (x_q.float() * x_scale) @ (w_q.float() * w_scale.T).T + (bias if with_bias else 0)
    args = [t.to(DEVICE) if t is not None else None for t in (x_q, x_scale, w_q, w_scale, bias)]
    got = linear_fp8(*args, torch.float32, config)
    # Exact fp32 sums in the interpreter; Hopper's fp8 MMA accumulates with fewer bits.
    tolerance = 1e-5 if DEVICE == "cpu" else 2e-3
    torch.testing.assert_close(got.cpu(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_linear_fp8_refuses_what_it_cannot_take() -> None:
    x_q, x_scale = quantize_rows_fp8(torch.randn(2, 64))
    w_q, w_scale = quantize_weight_fp8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="x_q and weight must be torch.float8_e4m3fn"):
        linear_fp8(x_q.float(), x_scale, w_q, w_scale, None, torch.float32)
    with pytest.raises(ValueError, match=r"weight_scale must be a contiguous \[1, 8\] float32 tensor"):
        linear_fp8(x_q, x_scale, w_q, w_scale.T, None, torch.float32)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \[8\] torch.bfloat16 tensor"):
        linear_fp8(x_q, x_scale, w_q, w_scale, torch.zeros(8), torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("rows", [1, 4, 16, 32])
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1024, 4096)])
def test_gpu_linear_fp8_is_near_cublas_at_real_sizes(rows: int, shape: tuple[int, int]) -> None:
    n, k = shape
    torch.manual_seed(rows)
    x_q, x_scale = quantize_rows_fp8(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16))
    w_q, w_scale = quantize_weight_fp8(torch.randn(n, k, device="cuda") / 50)
    got = linear_fp8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    want = (x_q.float() * x_scale) @ (w_q.float() * w_scale.T).T
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
    cublas = fp8_linear(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    torch.testing.assert_close(got.float(), cublas.float(), rtol=2e-2, atol=1e-2 * want.abs().max().item())
