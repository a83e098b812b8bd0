#!/usr/bin/env python3
"""Which cuBLAS kernel a GEMM runs at each row count, and what its first use costs (GPU).

cuBLAS picks a kernel per problem shape, and for a projection the pick changes with the
row count M (a step's tokens) every few rows; it loads each kernel at its first use, and
that load waits until the device has run all the work queued before it
(CUDA_MODULE_LOADING=EAGER does not change this). The shard's warm-up therefore runs the
row counts of shard/warmup.gemm_row_counts, so that the steps it plans for meet none of
them for the first time while serving.

For Llama-3.1-8B's GEMMs (q/k/v, o, gate/up, down, LM head), bf16 and with --fp8 the
row-wise scaled fp8 GEMM of `--quantize fp8`, it reports per shape and range of M:
  kernels     distinct kernels over every M of the range (names from torch.profiler)
  warmed      how many of them the warm-up's row counts load
  unwarmed_m  the share of the range's M values whose kernel the warm-up leaves unloaded
and first: the stall, the host time of one LM head call at a new M queued behind ~100 ms
of matmuls, against the same call at an M already run.

  python benchmark/gemm_kernels.py --out results/gemm_kernels.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shardgen.shard.layers.quant import FP8_DTYPE, fp8_linear
from shardgen.shard.warmup import gemm_row_counts

# (out features, in features) at Llama-3.1-8B sizes, one rank.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def parse_range(text: str) -> range:
    first, last = (int(v) for v in text.split("-"))
    return range(first, last + 1)


def gemm(shape: tuple[int, int], fp8: bool, max_rows: int, device: torch.device):
    """A function of M running the shape's GEMM on M rows, as the shard's layers do (F.linear,
    or quant.fp8_linear for an fp8 projection)."""
    n, k = shape
    if not fp8:
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(max_rows, k, device=device, dtype=torch.bfloat16)
        return lambda m: F.linear(x[:m], weight)
    weight = (torch.randn(n, k, device=device) * 0.02).to(FP8_DTYPE)
    x = torch.randn(max_rows, k, device=device).to(FP8_DTYPE)
    x_scale, weight_scale = torch.ones(max_rows, 1, device=device), torch.ones(1, n, device=device)
    return lambda m: fp8_linear(x[:m], x_scale[:m], weight, weight_scale, None, torch.bfloat16)


def kernels_by_rows(run, rows: range, device: torch.device) -> list[str]:
    """The GEMM kernels each M of `rows` runs, in order ("a + b" where cuBLAS splits K and
    reduces in a second kernel); calls are told apart by a fill between them."""
    marker = torch.empty(1, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for m in rows:
            marker.fill_(m)
            run(m)
        torch.cuda.synchronize()
    calls: list[list[str]] = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith("Memset"):
            continue
        if "fill" in event.name.lower():
            calls.append([])
        else:
            calls[-1].append(event.name)
    if len(calls) != len(rows) or not all(calls):
        raise RuntimeError(f"expected the kernels of {len(rows)} calls, got {len(calls)}")
    return [" + ".join(names) for names in calls]


def stall(device: torch.device) -> dict[str, float]:
    """Host ms of an LM head call at a new M, then at the same M, each behind queued work."""
    run = gemm(SHAPES["lm_head"], False, 512, device)
    busy = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    busy @ busy
    torch.cuda.synchronize()
    out = {}
    for label in ("first_call_ms", "second_call_ms"):
        for _ in range(60):
            busy @ busy
        started = time.perf_counter()
        run(200)
        out[label] = (time.perf_counter() - started) * 1e3
        torch.cuda.synchronize()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranges", default="33-2048,2049-8448", help="ranges of M for the projections")
    parser.add_argument("--lm-head-range", default="1-512")
    parser.add_argument("--max-batch-size", type=int, default=256, help="the shard's, for the warmed row counts")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192, help="the shard's prefill budget")
    parser.add_argument("--fp8", action="store_true", help="also the fp8 projections")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    result: dict[str, object] = {"stall": stall(device), "device": torch.cuda.get_device_name(device),
                                 "warmed_rows": f"1-{args.max_batch_size}, {args.max_prefill_tokens}-"
                                                f"{args.max_prefill_tokens + args.max_batch_size}"}
    print(f"LM head at M=200 behind ~100 ms of queued work: first call {result['stall']['first_call_ms']:.2f} "
          f"ms on the host, second {result['stall']['second_call_ms']:.3f} ms")
    warmed_rows = set(gemm_row_counts(args.max_batch_size, args.max_prefill_tokens))
    cases = [(name, False, parse_range(args.lm_head_range if name == "lm_head" else r))
             for name in SHAPES for r in ([args.lm_head_range] if name == "lm_head" else args.ranges.split(","))]
    if args.fp8:
        cases += [(name, True, parse_range(r)) for name in SHAPES if name != "lm_head" for r in args.ranges.split(",")]
    rows_out = []
    print(f"{'gemm':8} {'dtype':5} {'M':>10} {'kernels':>7} {'warmed':>6} {'unwarmed_m':>10}")
    for name, fp8, rows in cases:
        names = kernels_by_rows(gemm(SHAPES[name], fp8, rows[-1], device), rows, device)
        loaded = {k for m, k in zip(rows, names) if m in warmed_rows}
        row = {"gemm": name, "dtype": "fp8" if fp8 else "bf16", "rows": f"{rows[0]}-{rows[-1]}",
               "kernels": len(set(names)), "warmed": len(loaded),
               "unwarmed_m": sum(k not in loaded for k in names) / len(names),
               "kernel_names": sorted(set(names))}
        rows_out.append(row)
        print(f"{name:8} {row['dtype']:5} {row['rows']:>10} {row['kernels']:7d} {row['warmed']:6d} "
              f"{100 * row['unwarmed_m']:9.1f}%")
    result["cases"] = rows_out
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
