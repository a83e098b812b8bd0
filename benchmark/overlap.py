#!/usr/bin/env python3
"""What the device gives the c256 floor: a decode attention beside a prefill GEMM, and the
GEMMs' sustained rate (GPU).

The floor of a load like #7's c256 adds the GEMMs' time (FLOPs over the matmul rate) to the
decode attention's (KV bytes over bandwidth), as if the device ran one at a time. Two
measurements say whether that is the device or only the floor's arithmetic:

  pairs      a prefill projection of M rows (cuBLAS through F.linear, as the shard's layers
             call it) and the Triton decode attention of B rows at context C, each alone,
             one after the other on one stream, and on two streams joined every iteration
             (what a batch split into a prompt part and a decode part could do, with the
             kernels the shard has); optionally under torch's cuBLAS SM carve-out, which
             asks the GEMM to leave SMs to the other stream.
  sustained  TFLOP/s of a Llama-3.1-8B layer's four projections at each M, run back to back
             for ~0.7 s per figure and round robin over M, so that the clocks a long prefill
             phase settles at fall on every M alike (shard_step.py's matmul rate is one
             8192^3 product at a time, the rate of a burst).
  read       GB/s that S programs (one per SM, up to the SM count) pull from HBM with
             plain loads through registers (as the decode attention loads K/V): how many
             SMs a memory-bound kernel needs, i.e. the SM time that a schedule running
             decode attention beside the GEMMs on SMs of its own would still give it.

  python benchmark/overlap.py --out results/overlap.json
  python benchmark/overlap.py --carveouts 0,16,32 --skip-sustained
  python benchmark/overlap.py --pairs "" --skip-sustained --read-sms 8,16,32,66,132
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from kernels import LLAMA_8B, make_paged_batch  # benchmark/kernels.py, beside this script

from shardgen.shard.kernels import attention
from shardgen.shard.kernels.checks import num_sms

# (in features, out features) of a Llama-3.1-8B layer's projections, one rank.
PROJECTIONS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
# (projection, prefill rows M, decode rows B): a staggered step of ~2K prompt tokens and a full
# prefill step, each beside half and a whole c256 batch of decodes.
DEFAULT_PAIRS = "gate_up:2048:128,gate_up:2048:256,gate_up:8192:128,gate_up:8192:256," \
                "down:2048:128,down:2048:256,qkv:8192:128,qkv:8192:256"
# (elements per load, warps, pipeline stages) of the read kernel; each S reports its best.
READ_CONFIGS = [(4096, 4, 1), (8192, 8, 1), (16384, 8, 1), (16384, 16, 1), (32768, 16, 1), (8192, 8, 3), (16384, 8, 3)]


def event_us(fn: Callable[[], object], iters: int) -> float:
    """Best of three: mean us per call over `iters` calls queued back to back."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / iters)
    return best


def pair(projection: str, m: int, b: int, context: int, carveout: int, iters: int,
         device: torch.device) -> dict[str, object]:
    """One GEMM and one decode attention: alone, on one stream, on two."""
    k, n = PROJECTIONS[projection]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    sz = LLAMA_8B
    batch = make_paged_batch(sz, torch.bfloat16, device.type, [context - 1] * b, [1] * b,
                             sz.q_heads, sz.kv_heads)
    scale = sz.head_dim ** -0.5
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def gemm() -> None:
        F.linear(x, weight)

    def attend() -> None:
        attention.paged_attention(*batch.args(), scale)

    def one_stream() -> None:
        gemm()
        attend()

    def two_streams() -> None:
        side.wait_stream(main)
        with torch.cuda.stream(side):
            attend()
        gemm()
        main.wait_stream(side)

    torch._C._set_sm_carveout_experimental(carveout or None)
    try:
        times = {"gemm_us": event_us(gemm, iters), "attention_us": event_us(attend, iters),
                 "one_stream_us": event_us(one_stream, iters), "two_streams_us": event_us(two_streams, iters)}
    finally:
        torch._C._set_sm_carveout_experimental(None)
    kv_bytes = b * context * sz.kv_heads * sz.head_dim * 2 * 2
    return {"gemm": projection, "m": m, "b": b, "context": context, "carveout": carveout, **times,
            "gemm_tflops": 2 * m * k * n / times["gemm_us"] / 1e6,
            "attention_gbs": kv_bytes / times["attention_us"] / 1e3,
            "two_streams_saved_us": times["one_stream_us"] - times["two_streams_us"]}


def sustained(rows: list[int], rounds: int, seconds: float, device: torch.device) -> list[dict[str, float]]:
    """TFLOP/s of the four projections at each M, ~`seconds` of GEMMs per figure, round robin."""
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for k, n in PROJECTIONS.values()]
    inputs = {m: [torch.randn(m, k, device=device, dtype=torch.bfloat16) for k, _ in PROJECTIONS.values()]
              for m in rows}
    flops = {m: sum(2 * m * k * n for k, n in PROJECTIONS.values()) for m in rows}

    def layer(m: int) -> None:
        for x, weight in zip(inputs[m], weights):
            F.linear(x, weight)

    out = []
    for round_ in range(rounds):
        for m in rows:
            layer(m)  # untimed: loads M's kernels (first round) and queues the timed calls behind one
            calls = max(4, int(seconds * 700e12 / flops[m]))  # ~`seconds` at ~700 TFLOP/s
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                layer(m)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            out.append({"round": round_, "m": m, "calls": calls, "ms": ms, "tflops": flops[m] * calls / ms / 1e9})
    return out


@triton.jit
def _read_kernel(x_ptr, sums_ptr, per_program, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Program p sums x[p * per_program, (p + 1) * per_program) in fp32: nothing but reads."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in tl.range(0, per_program, BLOCK, num_stages=STAGES):
        acc += tl.load(x_ptr + start + offset + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(sums_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def read_bandwidth(programs: list[int], total_bytes: int, device: torch.device) -> list[dict[str, object]]:
    """Best GB/s over READ_CONFIGS for each count of programs, reading ~total_bytes of bf16 once."""
    x = torch.randn(total_bytes // 2, device=device, dtype=torch.bfloat16)
    out = []
    for count in programs:
        best: dict[str, object] = {}
        for block, warps, stages in READ_CONFIGS:
            per_program = x.numel() // count // block * block
            sums = torch.empty(count, device=device, dtype=torch.float32)

            def read(per_program: int = per_program, sums: torch.Tensor = sums, block: int = block,
                     warps: int = warps, stages: int = stages) -> None:
                _read_kernel[(count,)](x, sums, per_program, BLOCK=block, STAGES=stages, num_warps=warps)

            us = event_us(read, iters=3)
            gbs = 2 * count * per_program / us / 1e3
            if gbs > best.get("gbs", 0.0):
                # The sums must be the data's: a read the compiler dropped would be fast and wrong.
                want = x[: count * per_program].view(count, per_program).float().sum(dim=1)
                error = ((sums - want).abs().max() / want.abs().max()).item()
                best = {"programs": count, "gbs": gbs, "us": us, "block": block, "num_warps": warps,
                        "num_stages": stages, "max_rel_err": error}
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="projection:M:B, comma-separated")
    parser.add_argument("--context", type=int, default=1152, help="the decode rows' context (c256's mean)")
    parser.add_argument("--carveouts", default="0", help="SMs asked of cuBLAS for the other stream, comma-separated")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--sustained-rows", default="1024,2048,4096,8192,8448")
    parser.add_argument("--rounds", type=int, default=4, help="the first is reported but left out of the range")
    parser.add_argument("--seconds", type=float, default=0.7)
    parser.add_argument("--skip-sustained", action="store_true")
    parser.add_argument("--read-sms", default="", help="program counts of the read measurement, comma-separated")
    parser.add_argument("--read-gib", type=float, default=2.0, help="GiB each read measurement reads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    result: dict[str, object] = {"device": torch.cuda.get_device_name(device)}

    specs = [spec for spec in args.pairs.split(",") if spec]
    if specs:
        print(f"{'gemm':8} {'M':>5} {'B':>4} {'carve':>5} {'GEMM us':>8} {'TFLOP/s':>7} {'attn us':>8} {'GB/s':>5} "
              f"{'1 stream':>9} {'2 streams':>9} {'saved':>7}")
    pairs = []
    for spec in specs:
        projection, m, b = spec.split(":")
        for carveout in (int(c) for c in args.carveouts.split(",")):
            row = pair(projection, int(m), int(b), args.context, carveout, args.iters, device)
            pairs.append(row)
            print(f"{projection:8} {m:>5} {b:>4} {carveout:5d} {row['gemm_us']:8.1f} {row['gemm_tflops']:7.0f} "
                  f"{row['attention_us']:8.1f} {row['attention_gbs']:5.0f} {row['one_stream_us']:9.1f} "
                  f"{row['two_streams_us']:9.1f} {row['two_streams_saved_us']:7.1f}")
    result["pairs"] = pairs

    if not args.skip_sustained:
        rows = [int(m) for m in args.sustained_rows.split(",")]
        runs = sustained(rows, args.rounds, args.seconds, device)
        result["sustained"] = runs
        print(f"\nsustained, the four projections of a layer, rounds 2-{args.rounds}:")
        for m in rows:
            rates = sorted(r["tflops"] for r in runs if r["m"] == m and r["round"] > 0)
            print(f"  M = {m:5d}: {rates[0]:.0f}-{rates[-1]:.0f} TFLOP/s")
    if args.read_sms:
        sms = num_sms(device)
        reads = read_bandwidth([int(c) for c in args.read_sms.split(",")], int(args.read_gib * 2**30), device)
        result["read"] = {"sms": sms, "rows": reads}
        print(f"\nread, {args.read_gib:g} GiB of bf16 by S programs ({sms} SMs; best of {len(READ_CONFIGS)} configs):")
        for row in reads:
            per_program = row["gbs"] / row["programs"]
            print(f"  S = {row['programs']:4d}: {row['gbs']:6.0f} GB/s ({per_program:5.1f} per program; "
                  f"block {row['block']}, {row['num_warps']} warps, {row['num_stages']} stages; "
                  f"sums off by {row['max_rel_err']:.1e})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
