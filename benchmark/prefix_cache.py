#!/usr/bin/env python3
"""Time to first token with and without prefix caching, on a shared-prefix load.

Boots the real launcher twice on the same model (prefix caching on, then
--disable-prefix-caching), runs the same shared-prefix dataset of benchmark/serve.py against
each, and prints both summaries side by side; --out writes them as JSON.

  python benchmark/prefix_cache.py --model-id ../shared/models/stories260K --device cpu \
      --prefix-len 384 --input-len 32 --output-len 16 --num-groups 8 --prompts-per-group 8 \
      --max-concurrency 8 --out benchmark/results/prefix_cache_cpu.json
  # GPU (8B): --model-id /tmp/llama8b --device cuda --prefix-len 2048 --input-len 128 \
  #     --output-len 256 --num-groups 64 --prompts-per-group 16 --max-concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402  (benchmark/serve.py, the load generator)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _boot(args: argparse.Namespace, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, "-m", "shardgen.launcher", "--model-id", args.model_id,
            "--device", args.device, "--hostname", "127.0.0.1", "--port", str(port), *extra,
            *args.launcher_args]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"launcher exited: see {log}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"server not up after {args.startup_timeout} s: see {log}")


def _run(args: argparse.Namespace, label: str, extra: list[str]) -> dict:
    log = Path(f"/tmp/shardgen-prefix-bench-{label}.log")
    process, url = _boot(args, extra, log)
    try:
        load = ["--url", url, "--tokenizer", args.tokenizer or args.model_id,
                "--dataset", "shared-prefix", "--prefix-len", str(args.prefix_len),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--num-groups", str(args.num_groups),
                "--prompts-per-group", str(args.prompts_per_group), "--ignore-eos",
                "--seed", str(args.seed)]
        if args.max_concurrency:
            load += ["--max-concurrency", str(args.max_concurrency)]
        print(f"--- prefix caching {label}")
        summary = serve.main(load)
        hits = requests.get(f"{url}/metrics", timeout=10).text
        summary["prefix_cache_hit_tokens"] = next(
            (float(line.split()[-1]) for line in hits.splitlines()
             if line.startswith("shardgen_prefix_cache_hit_tokens_total")), 0.0)
        return summary
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefix-len", type=int, default=384)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--launcher-args", nargs=argparse.REMAINDER, default=[],
                        help="Passed to both launchers (put last).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results = {"on": _run(args, "on", []), "off": _run(args, "off", ["--disable-prefix-caching"])}
    print(f"\n{'TTFT (ms)':<24}{'cached':>12}{'uncached':>12}{'ratio':>10}")
    for stat in ("mean", "median", "p99"):
        on, off = results["on"]["ttft_ms"][stat], results["off"]["ttft_ms"][stat]
        print(f"{stat:<24}{on:>12.1f}{off:>12.1f}{off / on if on else float('nan'):>10.2f}x")
    print(f"{'prefix hit tokens':<24}{results['on']['prefix_cache_hit_tokens']:>12.0f}"
          f"{results['off']['prefix_cache_hit_tokens']:>12.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
