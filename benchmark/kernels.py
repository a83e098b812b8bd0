#!/usr/bin/env python3
"""Times shardgen's Triton kernels against the torch reference and the memory floor (GPU).

For every kernel at Llama-3.1-8B sizes (32 query heads, 8 KV heads, head dim 128, hidden
4096, intermediate 14336, bf16, KV pages of 16 tokens) it reports, per case:
  triton_us / torch_us   median time of one call (triton.testing.do_bench; the torch
                         reference is shardgen.shard.layers, the CPU production path;
                         for linear it is F.linear, i.e. cuBLAS, timed in the CUDA graph
                         too under --cudagraph)
  floor_us               bytes the kernel must move / copy bandwidth measured first with a
                         large device-to-device copy; pct_floor = floor_us / triton_us
  tflops                 for attention: useful FLOPs / triton time
  max_err                max |triton - torch| on one call (a sanity check, not a test)
A table goes to stdout and everything to JSON (--out). Timings are never asserted.

  python benchmark/kernels.py --out results/kernels.json
  python benchmark/kernels.py --only decode,prefill --sweep        # also tries tile configs
  python benchmark/kernels.py --cudagraph                          # Triton times without launch overhead
  python benchmark/kernels.py --only linear --cudagraph --sweep     # decode GEMV vs cuBLAS at M = 1..32
  python benchmark/kernels.py --only linear --cudagraph --sweep --linear-rows 64,128,256   # tiles of more rows
  python benchmark/kernels.py --only linear_fp8 --cudagraph --sweep   # --quantize fp8's GEMV vs cuBLASLt
  TRITON_INTERPRET=1 python benchmark/kernels.py --tiny --dtype float16   # CPU: checks only (bf16 dots are wrong there)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
import triton.testing

from shardgen.shard.kernels import activation, attention, kv_cache, linear, norm, rotary
from shardgen.shard.kernels.attention_decode import DecodeConfig
from shardgen.shard.kernels.linear import LinearConfig
from shardgen.shard.kernels.attention_prefill import PrefillConfig
from shardgen.shard.kernels.checks import interpreting, next_power_of_2
from shardgen.shard.layers import activation as torch_activation
from shardgen.shard.layers import attention as torch_attention
from shardgen.shard.layers import norm as torch_norm
from shardgen.shard.layers import quant as torch_quant
from shardgen.shard.layers import rotary as torch_rotary

KERNELS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary", "write_kv", "rotary_and_write_kv", "decode",
           "prefill", "linear", "linear_fp8")
# The torch reference materialises K/V per query head; skip it past this many bytes.
TORCH_GATHER_LIMIT = 16 << 30
# Rows of x in the linear cases (--linear-rows): decode batches, up to the layers' Triton threshold of 32.
LINEAR_ROWS = "1,4,16,32"
# Past this many rows the sweep tries tiles of more rows (a batch's GEMM rather than a GEMV).
MEDIUM_LINEAR_ROWS = 32
# A CUDA graph replays calls back to back without flushing L2 (50 MB on an H100), so the
# linear cases cycle through copies of W totalling at least this much: each call streams
# its weight from HBM, as in a decode step where 32 layers' weights pass between uses.
LINEAR_WEIGHT_ROTATION_BYTES = 256 << 20


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int


LLAMA_8B = Sizes(hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128, block_size=16)
TINY = Sizes(hidden=64, intermediate=96, q_heads=8, kv_heads=2, head_dim=32, block_size=16)


@dataclass
class Case:
    """One timed call: the Triton kernel, its torch reference, and what it must move."""

    kernel: str
    name: str
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object] | None
    bytes_moved: int
    flops: int = 0
    # Returns max |triton - torch| over one call each.
    check: Callable[[], float] | None = None
    # For --sweep: the same call under another launch config.
    with_config: Callable[[object], Callable[[], object]] | None = None
    configs: list[object] = field(default_factory=list)
    # The torch reference can be captured too: under --cudagraph it is timed in a graph as well.
    torch_graph_safe: bool = False


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------ row-wise kernels


def rowwise_cases(sz: Sizes, dtype: torch.dtype, device: str, tokens: list[int]) -> Iterator[Case]:
    """Cases are yielded one by one so that only one case's tensors are alive at a time."""
    e = dtype.itemsize
    for t in tokens:
        x = torch.randn(t, sz.hidden, dtype=dtype, device=device)
        res = torch.randn_like(x)
        w = torch.randn(sz.hidden, dtype=dtype, device=device)
        yield Case(
            "rms_norm", f"T={t} H={sz.hidden}",
            lambda x=x, w=w: norm.rms_norm(x, w, 1e-5), lambda x=x, w=w: torch_norm.rms_norm(x, w, 1e-5),
            2 * t * sz.hidden * e + sz.hidden * e,
            check=lambda x=x, w=w: _max_err(norm.rms_norm(x, w, 1e-5), torch_norm.rms_norm(x, w, 1e-5)),
        )
        yield Case(
            "fused_add_rms_norm", f"T={t} H={sz.hidden}",
            lambda x=x, r=res, w=w: norm.fused_add_rms_norm(x, r, w, 1e-5),
            lambda x=x, r=res, w=w: torch_norm.fused_add_rms_norm(x, r, w, 1e-5),
            4 * t * sz.hidden * e + sz.hidden * e,
            check=lambda x=x, r=res, w=w: _max_err(
                norm.fused_add_rms_norm(x, r, w, 1e-5)[0], torch_norm.fused_add_rms_norm(x, r, w, 1e-5)[0]
            ),
        )
        gate_up = torch.randn(t, 2 * sz.intermediate, dtype=dtype, device=device)
        yield Case(
            "silu_and_mul", f"T={t} I={sz.intermediate}",
            lambda g=gate_up: activation.silu_and_mul(g), lambda g=gate_up: torch_activation.silu_and_mul(g),
            3 * t * sz.intermediate * e,
            check=lambda g=gate_up: _max_err(activation.silu_and_mul(g), torch_activation.silu_and_mul(g)),
        )
        yield _rotary_case(sz, dtype, device, t)
        yield _write_kv_case(sz, dtype, device, t)
        yield _rotary_and_write_kv_case(sz, dtype, device, t)


def _rotary_case(sz: Sizes, dtype: torch.dtype, device: str, t: int) -> Case:
    q = torch.randn(t, sz.q_heads, sz.head_dim, dtype=dtype, device=device)
    k = torch.randn(t, sz.kv_heads, sz.head_dim, dtype=dtype, device=device)
    angles = torch.rand(t, sz.head_dim // 2, device=device) * 1000
    cos, sin = angles.cos(), angles.sin()  # a rotation: repeated in-place calls stay bounded

    def check() -> float:
        want_q, _ = torch_rotary.apply_rotary(q, k, cos, sin)
        got_q, _ = rotary.apply_rotary(q.clone(), k.clone(), cos, sin)
        return _max_err(got_q, want_q)

    return Case(
        "rotary", f"T={t} Hq={sz.q_heads} Hkv={sz.kv_heads} D={sz.head_dim}",
        lambda: rotary.apply_rotary(q, k, cos, sin), lambda: torch_rotary.apply_rotary(q, k, cos, sin),
        2 * t * (sz.q_heads + sz.kv_heads) * sz.head_dim * dtype.itemsize + 2 * t * sz.head_dim // 2 * 4,
        check=check,
    )


def _write_kv_case(sz: Sizes, dtype: torch.dtype, device: str, t: int) -> Case:
    num_blocks = triton.cdiv(t, sz.block_size) + 1
    shape = (num_blocks, sz.block_size, sz.kv_heads, sz.head_dim)
    k_cache = torch.zeros(shape, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(t, sz.kv_heads, sz.head_dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * sz.block_size, device=device)[:t]

    def check() -> float:
        kv_cache.write_kv(key, value, k_cache, v_cache, slots)
        return _max_err(k_cache.view(-1, sz.kv_heads, sz.head_dim)[slots], key)

    return Case(
        "write_kv", f"T={t} Hkv={sz.kv_heads} D={sz.head_dim}",
        lambda: kv_cache.write_kv(key, value, k_cache, v_cache, slots),
        lambda: torch_attention.write_kv(key, value, k_cache, v_cache, slots),
        4 * t * sz.kv_heads * sz.head_dim * dtype.itemsize + 8 * t,
        check=check,
    )


def _rotary_and_write_kv_case(sz: Sizes, dtype: torch.dtype, device: str, t: int) -> Case:
    """The fused op, to compare with the rotary and write_kv cases of the same T run back to back."""
    q = torch.randn(t, sz.q_heads, sz.head_dim, dtype=dtype, device=device)
    k = torch.randn(t, sz.kv_heads, sz.head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    angles = torch.rand(t, sz.head_dim // 2, device=device) * 1000
    cos, sin = angles.cos(), angles.sin()  # a rotation: repeated in-place calls stay bounded
    num_blocks = triton.cdiv(t, sz.block_size) + 1
    k_cache = torch.zeros(num_blocks, sz.block_size, sz.kv_heads, sz.head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * sz.block_size, device=device)[:t]

    def check() -> float:
        want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
        want_q, _ = torch_rotary.rotary_and_write_kv(q, k, v, cos, sin, want_k_cache, want_v_cache, slots)
        got_q, _ = rotary.rotary_and_write_kv(q.clone(), k.clone(), v, cos, sin, k_cache, v_cache, slots)
        return max(_max_err(got_q, want_q), _max_err(k_cache, want_k_cache), _max_err(v_cache, want_v_cache))

    e = dtype.itemsize
    return Case(
        "rotary_and_write_kv", f"T={t} Hq={sz.q_heads} Hkv={sz.kv_heads} D={sz.head_dim}",
        lambda: rotary.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots),
        lambda: torch_rotary.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots),
        2 * t * (sz.q_heads + sz.kv_heads) * sz.head_dim * e + 2 * t * sz.head_dim // 2 * 4
        + 3 * t * sz.kv_heads * sz.head_dim * e + 8 * t,
        check=check,
    )


# ------------------------------------------------------------------------ attention


@dataclass
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q,
                self.max_seqlen_q)


def make_paged_batch(
    sz: Sizes, dtype: torch.dtype, device: str, cache_lens: list[int], q_lens: list[int], q_heads: int, kv_heads: int
) -> PagedBatch:
    """Random K/V in shuffled pages (as a long-running server's allocator leaves them)."""
    bs = sz.block_size
    needed = [triton.cdiv(c + n, bs) for c, n in zip(cache_lens, q_lens)]
    num_blocks = sum(needed) + 1
    shape = (num_blocks, bs, kv_heads, sz.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    ids = (torch.randperm(num_blocks - 1, device=device) + 1).int()
    width = max(needed)
    tables = torch.zeros(len(needed), width, dtype=torch.int32, device=device)
    start = 0
    for row, count in enumerate(needed):
        tables[row, :count] = ids[start : start + count]
        start += count
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([c + n for c, n in zip(cache_lens, q_lens)], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), q_heads, sz.head_dim, dtype=dtype, device=device)
    return PagedBatch(q, k_cache, v_cache, tables, seq_lens, cu, max(q_lens))


def attention_case(
    kernel: str, name: str, sz: Sizes, dtype: torch.dtype, device: str, cache_lens: list[int], q_lens: list[int],
    q_heads: int | None = None, kv_heads: int | None = None,
) -> Case:
    hq, hkv = q_heads or sz.q_heads, kv_heads or sz.kv_heads
    batch = make_paged_batch(sz, dtype, device, cache_lens, q_lens, hq, hkv)
    scale = sz.head_dim**-0.5
    d, e = sz.head_dim, dtype.itemsize
    seq_total = sum(c + n for c, n in zip(cache_lens, q_lens))
    # Causal: query i of a sequence sees ctx + i + 1 keys.
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in zip(cache_lens, q_lens))
    gather = len(q_lens) * max(c + n for c, n in zip(cache_lens, q_lens)) * hq * d * e * 2
    decode = kernel == "decode"

    def with_config(cfg: object) -> Callable[[], object]:
        key = "decode_config" if decode else "prefill_config"
        return lambda: attention.paged_attention(*batch.args(), scale, **{key: cfg})

    def torch_fn() -> object:
        return torch_attention.paged_attention(*batch.args(), scale)

    return Case(
        kernel, f"{name} Hq={hq} Hkv={hkv}",
        with_config(None), torch_fn if gather <= TORCH_GATHER_LIMIT else None,
        2 * seq_total * hkv * d * e + 2 * sum(q_lens) * hq * d * e,
        flops=4 * pairs * hq * d,
        check=(lambda: _max_err(with_config(None)(), torch_fn())) if gather <= TORCH_GATHER_LIMIT else None,
        with_config=with_config,
        configs=_decode_sweep() if decode else _prefill_sweep(),
    )


def _decode_sweep() -> list[object]:
    return [
        DecodeConfig(block_n=n, num_warps=w, num_stages=s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
    ]


def _prefill_sweep() -> list[object]:
    # 256-row tiles only with 8 warps: 4 would hold a [256, D] fp32 accumulator in 128 threads.
    return [
        PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        for m in (64, 128, 256) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
        if m < 256 or w == 8
    ]


def decode_cases(sz: Sizes, dtype: torch.dtype, device: str, tiny: bool) -> Iterator[Case]:
    shapes = [(1, 1024), (1, 32768), (8, 4096), (32, 2048), (64, 8192), (256, 1024), (256, 4096)]
    if tiny:
        shapes = [(1, 300), (3, 50)]
    for b, c in shapes:
        yield attention_case("decode", f"B={b} ctx={c}", sz, dtype, device, [c - 1] * b, [1] * b)
    gen = torch.Generator().manual_seed(0)
    ragged = torch.randint(1, 300 if tiny else 8192, (4 if tiny else 64,), generator=gen).tolist()
    yield attention_case("decode", f"B={len(ragged)} ctx=ragged<={max(ragged)}", sz, dtype, device,
                         [c - 1 for c in ragged], [1] * len(ragged))
    # One tensor-parallel rank of 8: 4 query heads on 1 KV head.
    b, c = (2, 100) if tiny else (64, 4096)
    yield attention_case("decode", f"B={b} ctx={c} (TP=8)", sz, dtype, device, [c - 1] * b, [1] * b,
                         q_heads=sz.q_heads // 8 or 1, kv_heads=1)


def prefill_cases(sz: Sizes, dtype: torch.dtype, device: str, tiny: bool) -> Iterator[Case]:
    k = 64 if tiny else 1  # shrinks every length for --tiny
    prompt, long_prompt, cached, chunk_prefix = 2048 // k, 8192 // k, 2048 // k, 6144 // k
    running = 8 if tiny else 248
    specs = [
        (f"1 prompt {prompt}", [0], [prompt]),
        (f"1 prompt {long_prompt}", [0], [long_prompt]),
        (f"4 prompts {512 // k} after {cached} cached", [cached] * 4, [512 // k] * 4),
        (f"chunk {prompt} after {chunk_prefix}", [chunk_prefix], [prompt]),
        # Long contexts (the default limit on a GPU is the model's, 131,072 for Llama 3.1):
        # the last 8,192-token chunks of 64K and 100K prompts.
        (f"chunk {long_prompt} after {57344 // k}", [57344 // k], [long_prompt]),
        (f"chunk {long_prompt} after {91808 // k}", [91808 // k], [long_prompt]),
        (f"16 decodes ctx {cached} + prompt {1024 // k}", [cached - 1] * 16 + [0], [1] * 16 + [1024 // k]),
        # The shared-prefix load: a burst of cached questions while the others decode.
        (f"56 decodes ctx {2300 // k} + 8 x {128 // k} after {cached}", [2300 // k - 1] * 56 + [cached] * 8,
         [1] * 56 + [128 // k] * 8),
        # A full prefill step of c256 (256 x 1024 prompts) late in its prefill phase.
        (f"{running} decodes ctx {1150 // k} + 8 x {1024 // k}", [1150 // k - 1] * running + [0] * 8,
         [1] * running + [1024 // k] * 8),
    ]
    for name, cache_lens, q_lens in specs:
        yield attention_case("prefill", name, sz, dtype, device, cache_lens, q_lens)


# ------------------------------------------------------------------------ linear


def _projections(sz: Sizes) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's projections at TP = 1."""
    return [
        ("qkv", (sz.q_heads + 2 * sz.kv_heads) * sz.head_dim, sz.hidden),
        ("o_proj", sz.hidden, sz.q_heads * sz.head_dim),
        ("gate_up", 2 * sz.intermediate, sz.hidden),
        ("down", sz.hidden, sz.intermediate),
    ]


def linear_cases(sz: Sizes, dtype: torch.dtype, device: str, rows: list[int]) -> Iterator[Case]:
    """The projections of one decoder layer (TP = 1), x of each of `rows` rows."""
    for name, n, k in _projections(sz):
        copies = max(1, triton.cdiv(LINEAR_WEIGHT_ROTATION_BYTES, n * k * dtype.itemsize))
        weights = [torch.randn(n, k, dtype=dtype, device=device) / k**0.5 for _ in range(copies)]
        for m in rows:
            yield _linear_case(name, m, weights, dtype, device)
        del weights


def _linear_case(name: str, m: int, weights: list[torch.Tensor], dtype: torch.dtype, device: str) -> Case:
    n, k = weights[0].shape
    x = torch.randn(m, k, dtype=dtype, device=device)
    turn = itertools.count()

    def next_weight() -> torch.Tensor:
        return weights[next(turn) % len(weights)]

    def with_config(cfg: object) -> Callable[[], object]:
        return lambda: linear.linear(x, next_weight(), config=cfg)  # type: ignore[arg-type]

    return Case(
        "linear", f"{name} M={m} N={n} K={k}",
        with_config(None), lambda: torch.nn.functional.linear(x, next_weight()),
        (n * k + m * k + m * n) * dtype.itemsize,
        flops=2 * m * n * k,
        check=lambda: _max_err(linear.linear(x, weights[0]), torch.nn.functional.linear(x, weights[0])),
        with_config=with_config,
        configs=_linear_sweep(m),
        torch_graph_safe=True,
    )


def linear_fp8_cases(sz: Sizes, device: str, rows: list[int]) -> Iterator[Case]:
    """The projections of one decoder layer under --quantize fp8: e4m3 weights with a scale
    per output row, x quantized per token, bf16 out; the reference is cuBLASLt's scaled GEMM."""
    for name, n, k in _projections(sz):
        copies = max(1, triton.cdiv(LINEAR_WEIGHT_ROTATION_BYTES, n * k))
        weights = [torch_quant.quantize_weight_fp8(torch.randn(n, k, device=device) / k**0.5) for _ in range(copies)]
        for m in rows:
            yield _linear_fp8_case(name, m, weights, device)
        del weights


def _linear_fp8_case(name: str, m: int, weights: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> Case:
    n, k = weights[0][0].shape
    x_q, x_scale = torch_quant.quantize_rows_fp8(torch.randn(m, k, dtype=torch.bfloat16, device=device))
    turn = itertools.count()

    def next_weight() -> tuple[torch.Tensor, torch.Tensor]:
        return weights[next(turn) % len(weights)]

    def with_config(cfg: object) -> Callable[[], object]:
        return lambda: linear.linear_fp8(x_q, x_scale, *next_weight(), None, torch.bfloat16,
                                         config=cfg)  # type: ignore[arg-type]

    def check() -> float:
        w_q, w_scale = weights[0]
        return _max_err(linear.linear_fp8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16),
                        torch_quant.fp8_linear(x_q, x_scale, w_q, w_scale, None, torch.bfloat16))

    return Case(
        "linear_fp8", f"{name} M={m} N={n} K={k}",
        with_config(None), lambda: torch_quant.fp8_linear(x_q, x_scale, *next_weight(), None, torch.bfloat16),
        n * k + m * k + 2 * m * n + 4 * (m + n),
        flops=2 * m * n * k,
        check=check,
        with_config=with_config,
        configs=_linear_fp8_sweep(m),
        torch_graph_safe=True,
    )


def _linear_sweep(m: int) -> list[object]:
    """Tensor-core tiles (W bytes in flight per program = block_n * block_k * e * num_stages), unsplit and
    split in 2; broadcast-FMA tiles for one row; past MEDIUM_LINEAR_ROWS rows, _medium_linear_sweep's."""
    if m > MEDIUM_LINEAR_ROWS:
        return _medium_linear_sweep(m)
    dot = [
        LinearConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, use_dot=True, split_k=1)
        for n, k, w, s in (
            (64, 256, 4, 4), (64, 256, 4, 5), (64, 256, 8, 4), (64, 512, 4, 3), (64, 512, 8, 2), (64, 128, 4, 6),
            (32, 512, 4, 4), (32, 512, 4, 3), (32, 256, 4, 6), (16, 512, 4, 4), (16, 1024, 4, 3),
            (128, 128, 4, 5), (128, 256, 4, 3), (128, 256, 8, 3),
        )
    ]
    split = [LinearConfig(block_n=n, block_k=k, num_stages=4, split_k=2) for n, k in ((64, 256), (32, 512))]
    if m > 1:
        return dot + split
    broadcast = [
        LinearConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, use_dot=False, split_k=1)
        for n, k, w, s in ((8, 512, 4, 3), (8, 512, 4, 1), (4, 1024, 4, 3), (8, 1024, 8, 3), (16, 512, 4, 3))
    ]
    return dot + split + broadcast


def _linear_fp8_sweep(m: int) -> list[object]:
    """e4m3 tiles: a byte per W element, so twice _linear_sweep's block_k for the same bytes in
    flight; split in 2; broadcast-FMA tiles for one row."""
    dot = [
        LinearConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, use_dot=True, split_k=1)
        for n, k, w, s in (
            (64, 256, 4, 6), (64, 256, 4, 4), (64, 256, 4, 8), (64, 512, 4, 3), (64, 512, 4, 4), (64, 512, 8, 3),
            (32, 512, 4, 6), (32, 1024, 4, 3), (16, 1024, 4, 4), (128, 256, 4, 4), (128, 256, 8, 4),
            (128, 512, 8, 2), (64, 128, 4, 8),
        )
    ]
    split = [LinearConfig(block_n=n, block_k=k, num_stages=s, split_k=2) for n, k, s in ((64, 256, 6), (64, 512, 3))]
    if m > 1:
        return dot + split
    broadcast = [
        LinearConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, use_dot=False, split_k=1)
        for n, k, w, s in ((8, 1024, 4, 3), (4, 2048, 4, 3), (8, 2048, 8, 2), (16, 1024, 4, 3))
    ]
    return dot + split + broadcast


def _medium_linear_sweep(m: int) -> list[object]:
    """Tiles for more rows than a decode GEMV's (a batch of 33-256): up to 256 rows of x
    per program, so that W is read once, with 4-8 warps; configs that differ only in a
    block_m larger than m needs appear once."""
    configs = {}
    for bm, n, k, w, s in (
        (64, 64, 128, 4, 4), (64, 64, 128, 4, 6), (64, 128, 64, 4, 4), (64, 128, 128, 8, 4),
        (128, 64, 64, 4, 4), (128, 64, 128, 4, 4), (128, 64, 128, 8, 4), (128, 128, 64, 8, 4),
        (128, 128, 128, 8, 3), (256, 64, 64, 8, 4), (256, 64, 128, 8, 3), (256, 128, 64, 8, 3),
    ):
        cfg = LinearConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, block_m=min(bm, next_power_of_2(m)))
        configs[cfg] = None
    configs[LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2,
                         block_m=min(128, next_power_of_2(m)))] = None
    return list(configs)


# ------------------------------------------------------------------------ timing


def measure_bandwidth(device: str, size_bytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * size_bytes / (ms * 1e-3)


def time_us(fn: Callable[[], object], cudagraph: bool) -> float:
    if cudagraph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def run_case(case: Case, bandwidth: float, timed: bool, cudagraph: bool, sweep: bool) -> dict[str, object]:
    row: dict[str, object] = {"kernel": case.kernel, "case": case.name, "bytes": case.bytes_moved, "flops": case.flops}
    row["max_err"] = case.check() if case.check else None
    if not timed:
        return row
    triton_us = time_us(case.triton_fn, cudagraph)
    torch_us = time_us(case.torch_fn, cudagraph and case.torch_graph_safe) if case.torch_fn else None
    floor_us = case.bytes_moved / bandwidth * 1e6
    row.update(
        triton_us=triton_us,
        torch_us=torch_us,
        speedup=torch_us / triton_us if torch_us else None,
        floor_us=floor_us,
        pct_floor=100 * floor_us / triton_us,
        tflops=case.flops / (triton_us * 1e-6) / 1e12 if case.flops else None,
    )
    if sweep and case.with_config and case.configs:
        timings = []
        for cfg in case.configs:
            try:
                timings.append((time_us(case.with_config(cfg), cudagraph), cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  {case.kernel} {case.name}: {cfg} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if timings:
            best_us, best = min(timings, key=lambda pair: pair[0])
            row.update(best_us=best_us, best_config=asdict(best))  # type: ignore[call-overload]
            row["sweep"] = [{"us": us, **asdict(cfg)} for us, cfg in timings]  # type: ignore[call-overload]
    return row


def _fmt(value: object, spec: str) -> str:
    """format(value, spec), or a dash of the same width when there is no value."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return f"{'-':>{width}}" if value is None else format(value, spec)


HEADER = (
    f"{'kernel':<19} {'case':<46} {'triton us':>10} {'torch us':>10} {'speedup':>8} "
    f"{'floor us':>9} {'%floor':>7} {'TFLOP/s':>8} {'max err':>9}"
)


def print_row(r: dict[str, object]) -> None:
    print(
        f"{r['kernel']:<19} {r['case']:<46} {_fmt(r.get('triton_us'), '10.1f')} {_fmt(r.get('torch_us'), '10.1f')} "
        f"{_fmt(r.get('speedup'), '8.2f')} {_fmt(r.get('floor_us'), '9.1f')} {_fmt(r.get('pct_floor'), '7.1f')} "
        f"{_fmt(r.get('tflops'), '8.1f')} {_fmt(r.get('max_err'), '9.2e')}",
        flush=True,
    )
    if "best_config" in r:
        print(f"{'':<19} best of sweep: {r['best_us']:.1f} us with {r['best_config']}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--tokens", default="1,64,512,4096", help="token counts of the row-wise cases")
    parser.add_argument("--linear-rows", default=LINEAR_ROWS, help="rows of x in the linear cases")
    parser.add_argument("--cudagraph", action="store_true", help="time Triton calls replayed in a CUDA graph")
    parser.add_argument("--sweep", action="store_true", help="also time attention and linear under other tile configs")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; without CUDA only the checks run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; choose from {','.join(KERNELS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and interpreting()):
        raise SystemExit("needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1 for a CPU check run)")
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    sz = TINY if args.tiny else LLAMA_8B
    torch.manual_seed(0)
    bandwidth = measure_bandwidth(device) if cuda else 0.0
    if cuda:
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    tokens = [int(t) for t in args.tokens.split(",")]
    linear_rows = [int(m) for m in args.linear_rows.split(",")]
    groups: list[Iterator[Case]] = [
        (c for c in rowwise_cases(sz, dtype, device, tokens) if c.kernel in only),
        decode_cases(sz, dtype, device, args.tiny) if "decode" in only else iter(()),
        prefill_cases(sz, dtype, device, args.tiny) if "prefill" in only else iter(()),
        linear_cases(sz, dtype, device, linear_rows) if "linear" in only else iter(()),
        linear_fp8_cases(sz, device, linear_rows) if "linear_fp8" in only else iter(()),
    ]
    rows = []
    print(HEADER)
    for case in itertools.chain.from_iterable(groups):
        rows.append(run_case(case, bandwidth, cuda, args.cudagraph, args.sweep))
        print_row(rows[-1])
        del case  # frees this case's tensors before the next is built
    print()
    print(HEADER)
    for row in rows:
        print_row(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
            "sizes": asdict(sz), "bandwidth_gbps": bandwidth / 1e9, "cudagraph": args.cudagraph,
        }
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
