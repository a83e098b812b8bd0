#!/usr/bin/env python3
"""Load generator for shardgen's HTTP API, in the manner of `vllm bench serve`.

Sends streaming requests (/generate_stream) from a dataset built with a tokenizer, at a
request rate (Poisson arrivals) or up to a maximum concurrency, and reports request and
token throughput, time to first token (TTFT), time per output token (TPOT) and inter-token
latency (ITL): mean, median and p99, as a table and as JSON.

Datasets (prompts are random token ids, decoded to text, so any tokenizer works):
  fixed          every prompt --input-len tokens, --output-len new tokens
  random         lengths drawn uniformly in [len * (1 - range_ratio), len * (1 + range_ratio)]
  shared-prefix  --num-groups groups of --prompts-per-group prompts; each group shares a
                 --prefix-len-token prefix followed by a --input-len-token question

Example:
  python benchmark/serve.py --url http://127.0.0.1:3000 --tokenizer ../shared/tokenizers/llama3 \
      --dataset fixed --num-prompts 256 --input-len 1024 --output-len 256 --max-concurrency 64 \
      --ignore-eos --out results/fixed.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_tokens: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    sent_s: float = 0.0   # when the request left, from the start of the load


def _random_text(tokenizer, rng: random.Random, length: int) -> str:
    """Text of about `length` tokens: random ids, decoded, re-tokenized and cut to length
    (random ids of a small vocabulary decode to text that re-tokenizes much longer)."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(tokenizer.vocab_size, 32000)) if i not in special]
    text = tokenizer.decode([rng.choice(vocab) for _ in range(length)])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return tokenizer.decode(ids)


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))


def build_dataset(args: argparse.Namespace) -> list[BenchRequest]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    # A stream of its own per dataset: with one stream for all, `fixed` prompt 4g began with
    # shared-prefix group g's prefix (both draw 1,024 ids at a time from the same seed), so
    # a load after the other found ~1,000 tokens of 64 prompts in the prefix cache.
    rng = random.Random(f"{args.dataset}:{args.seed}")
    requests: list[BenchRequest] = []

    def add(prompt: str, output_len: int) -> None:
        tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        requests.append(BenchRequest(prompt, tokens, output_len))

    if args.dataset == "fixed":
        for _ in range(args.num_prompts):
            add(_random_text(tokenizer, rng, args.input_len), args.output_len)
    elif args.dataset == "random":
        for _ in range(args.num_prompts):
            add(_random_text(tokenizer, rng, _length(rng, args.input_len, args.range_ratio)),
                _length(rng, args.output_len, args.range_ratio))
    else:  # shared-prefix
        for _ in range(args.num_groups):
            prefix = _random_text(tokenizer, rng, args.prefix_len)
            for _ in range(args.prompts_per_group):
                add(prefix + _random_text(tokenizer, rng, args.input_len), args.output_len)
        rng.shuffle(requests)
    return requests


async def _send(session: aiohttp.ClientSession, url: str, request: BenchRequest,
                ignore_eos: bool, headers: dict[str, str]) -> RequestResult:
    payload = {"inputs": request.prompt,
               "parameters": {"max_new_tokens": request.output_len, "ignore_eos": ignore_eos,
                              "details": False}}
    result = RequestResult(ok=False, prompt_tokens=request.prompt_tokens)
    start = last = time.perf_counter()
    try:
        async with session.post(f"{url}/generate_stream", json=payload, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                now = time.perf_counter()
                if result.output_tokens == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_tokens += 1
    except aiohttp.ClientError as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency_s = time.perf_counter() - start
    result.ok = True
    return result


async def run_load(args: argparse.Namespace, dataset: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(args.max_concurrency or len(dataset))
    rng = random.Random(args.seed + 1)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(request: BenchRequest) -> RequestResult:
            async with limit:
                sent = time.perf_counter() - start
                result = await _send(session, args.url, request, args.ignore_eos, headers)
                result.sent_s = sent
                return result

        start = time.perf_counter()
        tasks = []
        for request in dataset:
            tasks.append(asyncio.create_task(one(request)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error.split(":")[0]] = errors.get(r.error.split(":")[0], 0) + 1
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "input_token_throughput": sum(r.prompt_tokens for r in done) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_output_tokens": output_tokens,
        "ttft_ms": {k: v * 1e3 for k, v in _stats([r.ttft_s for r in done]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _stats(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in _stats([x for r in done for x in r.itl_s]).items()},
        "e2e_ms": {k: v * 1e3 for k, v in _stats([r.latency_s for r in done]).items()},
    }


def print_table(summary: dict) -> None:
    print(f"{'completed / failed':<28}{summary['completed']} / {summary['failed']}")
    print(f"{'duration (s)':<28}{summary['duration_s']:.2f}")
    print(f"{'requests/s':<28}{summary['request_throughput']:.2f}")
    print(f"{'input tokens/s':<28}{summary['input_token_throughput']:.1f}")
    print(f"{'output tokens/s':<28}{summary['output_token_throughput']:.1f}")
    print(f"{'metric (ms)':<28}{'mean':>10}{'median':>10}{'p99':>10}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[name]
        print(f"{name:<28}{s['mean']:>10.2f}{s['median']:>10.2f}{s['p99']:>10.2f}")
    if summary["errors"]:
        print("errors:", summary["errors"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer folder used to build prompts.")
    parser.add_argument("--dataset", choices=["fixed", "random", "shared-prefix"], default="fixed")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--num-groups", type=int, default=64)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrival rate in requests/s (inf: all at once).")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--request-timeout", type=float, default=3600.0)
    parser.add_argument("--label", default="", help="Free text stored in the JSON.")
    parser.add_argument("--out", type=Path, default=None, help="Write the summary here as JSON.")
    parser.add_argument("--save-requests", action="store_true",
                        help="Also store each request's send time, TTFT and latency in the JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dataset = build_dataset(args)
    results, duration = asyncio.run(run_load(args, dataset))
    summary = summarize(results, duration)
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.save_requests:
        summary["requests"] = [
            {"sent_s": round(r.sent_s, 4), "ok": r.ok, "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.output_tokens, "ttft_ms": round(r.ttft_s * 1e3, 2),
             "e2e_ms": round(r.latency_s * 1e3, 2)} for r in results]
    print_table(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
