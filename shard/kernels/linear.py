"""linear: y = x W^T + b for a few rows of x (decode), streaming W once at memory speed.

With M <= 16 rows the product is a matrix-vector product per row: 2*M FLOPs per weight
element read, far below what Hopper needs to be compute-bound, so the only goal is to read
W [N, K] once at full bandwidth with enough programs in flight. cuBLAS misses that at
decode sizes (too few output tiles without split-K, or split-K plus a reduce kernel).

Algorithm
  Program (m, n, s) owns output columns [n * BLOCK_N, (n + 1) * BLOCK_N) of rows
  [m * BLOCK_M, (m + 1) * BLOCK_M) and K range s of the split (BLOCK_K-aligned). It loops
  over K in BLOCK_K steps, loading a [BLOCK_N, BLOCK_K] tile of W (rows of W are
  contiguous along K: coalesced 16-byte loads) and the matching [BLOCK_M, BLOCK_K] slice
  of x (tiny, served from L1/L2). Two ways to multiply, picked per config:
    use_dot   tl.dot(W tile, x slice^T) on the tensor cores, x padded to 16 rows (tl.dot's
              minimum). W is the left operand so that BLOCK_N >= 64 can use Hopper's wgmma.
              The MMA work is free; what matters is that loads feeding tl.dot are
              software-pipelined through shared memory (cp.async, num_stages deep), so a
              program keeps ~100 KB of W in flight on few registers. This is the default:
              on an H100, 64 programs of [64, 128] tiles six deep stream o_proj's W at
              ~80% of the copy floor, for M = 1 as for M = 16.
    broadcast an fp32 [BLOCK_N, BLOCK_M, BLOCK_K] accumulator takes elementwise FMAs and is
              summed over K once, after the loop (the classic GEMV). Its loads go to
              registers, unpipelined, so it needs many narrow programs to hide latency and
              its registers grow with M: it wins only for one row and large N (gate_up,
              7168 programs of 4 rows), and loses where programs are few or short (o_proj).
  Accumulation is fp32 in both. K is split only when the output tiles leave more than half
  the SMs idle (small N, e.g. a tensor-parallel shard; choose_split_k). With split_k = 1 the
  program adds the bias and writes y in x's dtype. With split_k > 1 each program writes an
  fp32 partial [split, M, N] and a second kernel sums the splits in a fixed order, adds the
  bias and casts: deterministic (no atomics), so greedy decoding does not depend on timing.

Launch parameters depend on shapes only (no device value is read): capturable in a CUDA
graph.

Memory floor (bytes, e = element size): N*K*e (W) + M*K*e (x) + M*N*e (y) [+ N*e bias],
plus 2*split_k*M*N*4 for the partials when split. FLOPs 2*M*N*K.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from shardgen.shard.kernels.checks import (
    FLOAT_DTYPES,
    check_dims,
    check_float,
    check_last_dim_contiguous,
    check_same_device,
    check_tile,
    dependent_launch,
    dependent_launch_args,
    dot_precision,
    next_power_of_2,
    num_sms,
    require,
)
from shardgen.shard.layers.quant import FP8_DTYPE

# No split is shorter than this many K elements: each must stream long enough to pay off.
MIN_SPLIT_K = 512
MAX_SPLIT_K = 16
# Rows of x one program multiplies on the tensor cores (a larger M takes more programs).
MAX_BLOCK_M = 64


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters of the linear kernel.

    split_k None lets choose_split_k decide from the shape and the SM count (the
    production setting); a number forces the split (tests, tuning). block_m: the most rows
    of x one program takes (MAX_BLOCK_M when None); fewer when x has fewer.
    """

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True
    split_k: int | None = None
    block_m: int | None = None

    def __post_init__(self) -> None:
        check_tile("block_k", self.block_k)
        check_tile("block_n", self.block_n, minimum=16 if self.use_dot else 1)
        if self.block_m is not None:
            check_tile("block_m", self.block_m, minimum=16 if self.use_dot else 1)
        split = self.split_k
        require(
            split is None or 1 <= split <= MAX_SPLIT_K,
            f"split_k must be None or in [1, {MAX_SPLIT_K}], got {split}",
        )


# (largest M or None for any, smallest N, smallest K, config): the first row that
# x [M, K] @ W[N, K]^T meets wins, else DEFAULT_CONFIG. From a sweep on an H100 (bf16, CUDA
# graph, W streamed from HBM; benchmark/kernels.py --only linear --cudagraph --sweep): at
# Llama-3.1-8B's projections DEFAULT_CONFIG is within 2% of the best config at M = 1, 4, 16,
# except where a row says otherwise.
CONFIG_TABLE: tuple[tuple[int | None, int, int, LinearConfig], ...] = (
    # One row, many output tiles (gate_up: 76.9 us vs 78.8 on the tensor cores; floor 77.8).
    (1, 16384, 0, LinearConfig(block_n=4, block_k=1024, num_warps=4, num_stages=3, use_dot=False)),
    # Long K (down): 41.9-43.0 us vs 42.6-43.0.
    (None, 0, 8192, LinearConfig(block_n=64, block_k=256, num_warps=4, num_stages=5)),
)
# [64, 128] W tiles (16 KB at bf16) six deep in the pipeline: ~100 KB in flight per program.
DEFAULT_CONFIG = LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=6)
# e4m3 weights (linear_fp8): tiles twice as long along K for the same bytes in flight.
FP8_CONFIG = LinearConfig(block_n=64, block_k=256, num_warps=4, num_stages=6)
# linear_fp8's rows, as CONFIG_TABLE's (benchmark/kernels.py --only linear_fp8 --cudagraph --sweep).
FP8_CONFIG_TABLE: tuple[tuple[int | None, int, int, LinearConfig], ...] = (
    # Many output tiles (gate_up: 448 of 64 rows): four stages (80 KB of shared memory) let
    # two programs share an SM, six (120 KB) only one. At M = 1-32: 41.0-43.2 us against
    # 41.9-44.7 on an H100 (floor 39.0-39.6), 29.3-31.7 against 32.5-34.9 on an H200.
    (None, 16384, 0, LinearConfig(block_n=64, block_k=256, num_warps=4, num_stages=4)),
)


def default_linear_config(m: int, n: int, k: int, *, fp8: bool = False) -> LinearConfig:
    """The config of CONFIG_TABLE (FP8_CONFIG_TABLE for e4m3 operands) for x [m, k] @ W[n, k]^T."""
    table, default = (FP8_CONFIG_TABLE, FP8_CONFIG) if fp8 else (CONFIG_TABLE, DEFAULT_CONFIG)
    for max_m, min_n, min_k, config in table:
        if (max_m is None or m <= max_m) and n >= min_n and k >= min_k:
            return config
    return default


def choose_split_k(n_tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Splits of K when the output tiles fill fewer than half the SMs; none under MIN_SPLIT_K elements.

    Half, because the split costs a second launch: on an H100, 64 unsplit tiles of 64 rows
    (o_proj, N = 4096) beat 128 half-length programs plus the reduce, 14.1 us vs 15.2.
    """
    by_occupancy = num_sms(device) // 2 // max(n_tiles, 1)
    by_length = k // max(MIN_SPLIT_K, block_k)
    return max(1, min(by_occupancy, by_length, MAX_SPLIT_K))


@functools.lru_cache(maxsize=None)
def _max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may use (the limit Triton checks at launch)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def pipeline_stages(cfg: LinearConfig, block_m: int, element_size: int, device: torch.device) -> int:
    """cfg.num_stages, or fewer where that many [block_n + block_m, block_k] tiles of W and x
    would overflow shared memory (more rows of x, or fp32)."""
    if device.type != "cuda":
        return cfg.num_stages
    index = device.index if device.index is not None else torch.cuda.current_device()
    stage_bytes = (cfg.block_n + block_m) * cfg.block_k * element_size
    return max(1, min(cfg.num_stages, _max_shared_memory(index) // stage_bytes))


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    x_scale_ptr,
    w_scale_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[rows, cols] = x[rows] @ W[cols]^T (+ bias), or, when PARTIAL, the fp32 sum over
    this program's K split into out[split, rows, cols] (out then is [splits, M, N]). SCALED
    (fp8 x and W): each product sum is multiplied by x_scale[row] * w_scale[col] first."""
    dependent_launch(USE_PDL)
    # Row blocks vary fastest: the programs that share a W tile run together and read it
    # from HBM once, the others from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Columns past N wrap around to rows of W that exist (loads need no mask); the store drops them.
    w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * K
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    m_ok = offs_m < M
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc3 += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    if SCALED:
        w_scale = tl.load(w_scale_ptr + offs_n % N)
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        acc = acc * w_scale[:, None] * x_scale[None, :]
    store_ok = (offs_n < N)[:, None] & m_ok[None, :]
    if PARTIAL:
        out = out_ptr + pid_s.to(tl.int64) * M * N + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(out, acc, mask=store_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _sum_splits_kernel(
    partial_ptr, bias_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[m, n] = sum over s of partial[s, m, n] (s in order) (+ bias[n]), cast to out's dtype."""
    dependent_launch(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    size = M * N
    ok = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * size + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


class LaunchPlan(NamedTuple):
    """What a call of a given shape launches (cached per shape: the eager path calls ~130 times a step)."""

    config: LinearConfig
    block_m: int
    grid: tuple[int, int, int]   # (row blocks, column tiles, K splits)
    k_per_split: int
    num_stages: int


@functools.lru_cache(maxsize=1024)
def plan_launch(
    m: int, n: int, k: int, element_size: int, device: torch.device, config: LinearConfig | None
) -> LaunchPlan:
    """The config (config, else the table's), tile sizes and grid for x [m, k] @ W[n, k]^T; m, n, k > 0.

    One-byte operands are linear_fp8's e4m3: their table is FP8_CONFIG_TABLE."""
    cfg = config or default_linear_config(m, n, k, fp8=element_size == 1)
    block_m = min(next_power_of_2(m), cfg.block_m or MAX_BLOCK_M)
    if cfg.use_dot:
        block_m = max(16, block_m)
    n_tiles = triton.cdiv(n, cfg.block_n)
    split = cfg.split_k or choose_split_k(n_tiles, k, cfg.block_k, device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    grid = (triton.cdiv(m, block_m), n_tiles, triton.cdiv(k, k_per_split))
    return LaunchPlan(cfg, block_m, grid, k_per_split, pipeline_stages(cfg, block_m, element_size, device))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: LinearConfig | None = None
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> new [M, N] tensor in x's dtype (fp32 accumulation).

    Meant for small M (decode); any M is correct, but every block of MAX_BLOCK_M rows (or
    config.block_m) reads W again, from L2 where the blocks of a W tile run together (they
    are neighbours in the grid). x's rows may be strided (dense along K); weight and bias must be contiguous and
    share x's dtype and device, as in F.linear's common case.
    """
    _check_linear_args(x, weight, bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    plan = plan_launch(m, n, k, x.element_size(), x.device, config)
    _launch(x, weight, bias, out, None, None, plan)
    return out


def linear_fp8(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, config: LinearConfig | None = None,
) -> torch.Tensor:
    """shard/layers/quant.fp8_linear for few rows: (x_q * x_scale) @ (weight * weight_scale)^T
    (+ bias) -> new [M, N] in out_dtype, streaming the e4m3 weight once (half bf16's bytes).

    x_q [M, K] and weight [N, K] are e4m3 (x_q's rows may be strided, weight contiguous),
    x_scale [M, 1] and weight_scale [1, N] fp32, bias [N] in out_dtype. The fp8 products are
    summed in fp32 on the tensor cores, then scaled per row and column.
    """
    _check_fp8_args(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    m, k = x_q.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    plan = plan_launch(m, n, k, 1, x_q.device, config)
    _launch(x_q, weight, bias, out, x_scale, weight_scale, plan)
    return out


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    x_scale: torch.Tensor | None, weight_scale: torch.Tensor | None, plan: LaunchPlan,
) -> None:
    """Runs the plan: the product into out, through fp32 partials and their sum when K is split."""
    m, k = x.shape
    n = weight.shape[0]
    cfg, splits = plan.config, plan.grid[2]
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    scaled = x_scale is not None
    pdl = dependent_launch_args(x.device)
    _linear_kernel[plan.grid](
        x, weight, bias if bias is not None else weight, target,
        x_scale if scaled else weight, weight_scale if scaled else weight,
        m, n, k, x.stride(0), out.stride(0), plan.k_per_split,
        BLOCK_M=plan.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_DOT=cfg.use_dot,
        EVEN_K=k % cfg.block_k == 0,
        HAS_BIAS=bias is not None,
        PARTIAL=splits > 1,
        DOT_PRECISION=dot_precision(out.dtype),
        SCALED=scaled,
        **pdl,
        num_warps=cfg.num_warps,
        num_stages=plan.num_stages,
    )
    if splits > 1:
        block = min(1024, next_power_of_2(m * n))
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else target, out, m, n,
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block, **pdl, num_warps=4,
        )


def _check_fp8_args(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> None:
    require(x_q.dtype == weight.dtype == FP8_DTYPE, f"x_q and weight must be {FP8_DTYPE}, got {x_q.dtype} "
                                                    f"and {weight.dtype}")
    require(out_dtype in FLOAT_DTYPES, f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    _check_operands("x_q", x_q, weight, bias, out_dtype)
    m, n = x_q.shape[0], weight.shape[0]
    require(x_scale.shape == (m, 1) and x_scale.dtype == torch.float32 and x_scale.is_contiguous(),
            f"x_scale must be a contiguous [{m}, 1] float32 tensor, got {tuple(x_scale.shape)} {x_scale.dtype}")
    require(weight_scale.shape == (1, n) and weight_scale.dtype == torch.float32 and weight_scale.is_contiguous(),
            f"weight_scale must be a contiguous [1, {n}] float32 tensor, got {tuple(weight_scale.shape)} "
            f"{weight_scale.dtype}")
    check_same_device(x_q=x_q, x_scale=x_scale, weight=weight, weight_scale=weight_scale,
                      **({"bias": bias} if bias is not None else {}))


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float("x", x)
    require(weight.dtype == x.dtype, f"weight is {weight.dtype}, x is {x.dtype}: they must match")
    _check_operands("x", x, weight, bias, x.dtype)
    check_same_device(x=x, weight=weight, **({"bias": bias} if bias is not None else {}))


def _check_operands(x_name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> None:
    """x [M, K] with dense rows against a contiguous weight [N, K], and a contiguous bias [N]
    in out_dtype when there is one (linear's and linear_fp8's shared checks)."""
    check_dims(x_name, x, 2, "[M, K]")
    check_dims("weight", weight, 2, "[N, K]")
    require(weight.shape[1] == x.shape[1],
            f"{x_name} [M, K] has K={x.shape[1]}, weight [N, K] is {tuple(weight.shape)}")
    check_last_dim_contiguous(x_name, x)
    require(weight.is_contiguous(), f"weight must be contiguous, got strides {weight.stride()}")
    n = weight.shape[0]
    if bias is not None:
        require(bias.shape == (n,) and bias.dtype == out_dtype and bias.is_contiguous(),
                f"bias must be a contiguous [{n}] {out_dtype} tensor, got {tuple(bias.shape)} {bias.dtype}")
