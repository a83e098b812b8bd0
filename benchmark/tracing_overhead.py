#!/usr/bin/env python3
"""Tracing overhead: the same load against a server without and with an OTLP endpoint.

Each run boots the real launcher on CPU (integration-tests/harness.py), sends a short
warm-up, then the load of benchmark/serve.py (streaming /generate_stream requests, fixed
lengths, bounded concurrency), and stops the server. Runs alternate off/on --repeats
times so that drift on a shared machine hits both alike. With tracing on, the server
exports to an OTLP/gRPC receiver process (integration-tests/otlp_receiver.py) with the
default batching (OTEL_BSP_* unset), and the table says how many spans it received.

Wall-clock figures on a shared machine swing with its load; the CPU time the router and
the shards spent during the load (user + system, from /proc through psutil, exporter
threads included) per 1000 generated tokens is the steadier measure of what tracing adds.

Prints a table (median over the repeats of each mode) and writes every run as JSON.

  python benchmark/tracing_overhead.py --num-prompts 64 --input-len 32 --output-len 32 \\
      --max-concurrency 8 --repeats 3 --out benchmark/results/tracing_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmark"), str(ROOT / "integration-tests")]

# After the path set-up above: benchmark/serve.py (dataset, load, summary), the launcher
# harness and the OTLP receiver of the integration tests.
import serve
from harness import STORIES, Server
from otlp_receiver import OtlpReceiver

MODES = ("off", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", type=Path, default=STORIES)
    parser.add_argument("--num-shard", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every run here as JSON")
    return parser.parse_args(argv)


def load_args(args: argparse.Namespace, url: str, num_prompts: int) -> argparse.Namespace:
    """benchmark/serve.py's arguments for this load against `url`."""
    return serve.parse_args([
        "--url", url, "--tokenizer", str(args.model_id), "--dataset", "fixed",
        "--num-prompts", str(num_prompts), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--max-concurrency", str(args.max_concurrency),
        "--ignore-eos", "--seed", str(args.seed)])


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU time (user + system) used so far by the server's router and by its shards."""
    used = {"router": 0.0, "shards": 0.0}
    for process in psutil.Process(server.process.pid).children(recursive=True):
        command = " ".join(process.cmdline())
        kind = ("router" if "shardgen.router" in command
                else "shards" if "shardgen.shard" in command else None)
        if kind is not None:
            times = process.cpu_times()
            used[kind] += times.user + times.system
    return used


def one_run(args: argparse.Namespace, mode: str, receiver: OtlpReceiver, folder: Path,
            dataset: list[serve.BenchRequest]) -> dict[str, Any]:
    """Boot a server (tracing `mode`), warm it up, run the load, stop it; the summary."""
    flags = ["--model-id", str(args.model_id), "--num-shard", str(args.num_shard)]
    if mode == "on":
        flags += ["--otlp-endpoint", receiver.endpoint]
    spans_before = len(receiver.spans())
    server = Server(*flags, log_path=folder / f"launcher-{mode}.log",
                    env={"OMP_NUM_THREADS": "1"})
    try:
        warmup = load_args(args, server.url, num_prompts=4)
        asyncio.run(serve.run_load(warmup, dataset[:4]))
        cpu_before = cpu_seconds(server)
        results, duration = asyncio.run(serve.run_load(load_args(args, server.url,
                                                                 len(dataset)), dataset))
        cpu_after = cpu_seconds(server)
    finally:
        server.stop()  # the router and shards flush their spans on the way out
    summary = serve.summarize(results, duration)
    summary["mode"] = mode
    summary["spans"] = len(receiver.spans()) - spans_before
    thousands = max(summary["total_output_tokens"], 1) / 1000
    for kind in cpu_after:
        summary[f"{kind}_cpu_s_per_1k_tokens"] = (cpu_after[kind] - cpu_before[kind]) / thousands
    return summary


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def print_table(runs: list[dict[str, Any]]) -> None:
    rows = [("requests/s", ("request_throughput",)),
            ("output tokens/s", ("output_token_throughput",)),
            ("TTFT median (ms)", ("ttft_ms", "median")),
            ("ITL median (ms)", ("itl_ms", "median")),
            ("ITL p99 (ms)", ("itl_ms", "p99")),
            ("e2e median (ms)", ("e2e_ms", "median")),
            ("router CPU s / 1k tokens", ("router_cpu_s_per_1k_tokens",)),
            ("shards CPU s / 1k tokens", ("shards_cpu_s_per_1k_tokens",)),
            ("failed requests", ("failed",)),
            ("spans received", ("spans",))]
    by_mode = {mode: [run for run in runs if run["mode"] == mode] for mode in MODES}
    print(f"{'median over ' + str(len(by_mode['off'])) + ' runs':<24}"
          f"{'tracing off':>14}{'tracing on':>14}{'on vs off':>12}")
    for label, path in rows:
        off, on = (_median(by_mode[mode], *path) for mode in MODES)
        change = f"{(on - off) / off * 100:+.1f}%" if off else ""
        print(f"{label:<24}{off:>14.2f}{on:>14.2f}{change:>12}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    dataset = serve.build_dataset(load_args(args, "", args.num_prompts))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sg-trace-bench-") as tmp:
        folder = Path(tmp)
        receiver = OtlpReceiver(folder / "spans.jsonl")
        try:
            for repeat in range(args.repeats):
                for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):
                    run = one_run(args, mode, receiver, folder, dataset)
                    print(f"run {repeat + 1} tracing {mode}: "
                          f"{run['output_token_throughput']:.1f} tokens/s, "
                          f"CPU s/1k tokens router {run['router_cpu_s_per_1k_tokens']:.3f} "
                          f"shards {run['shards_cpu_s_per_1k_tokens']:.3f}, "
                          f"{run['spans']} spans", flush=True)
                    runs.append(run)
        finally:
            receiver.stop()
    print_table(runs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {key: str(value) for key, value in vars(args).items()}
        args.out.write_text(json.dumps({"config": config, "runs": runs}, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    main()
