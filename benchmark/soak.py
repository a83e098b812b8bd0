#!/usr/bin/env python3
"""Soak benchmark: minutes of mixed load with random disconnects against a launcher it starts.

It starts `shardgen-launcher` on 127.0.0.1 (CPU by default), then keeps --concurrency
clients busy for --duration seconds, each sending one request after another, drawn from
a mix: greedy streams (a share of them hang up after a few tokens), whole generations
with sampling or stop sequences, OpenAI-style completions, requests with a deadline too
short to meet, malformed requests, and (with --faults) prompts that make the shard's step
fail (test-only fault injection, shard/faults.py). More clients than
--max-concurrent-requests keep the 429 path busy too (a refused client backs off for
0.2-1 s before its next request).

It reports requests served, outcomes by type (unexpected ones must be zero), greedy
answers that differ from the same prompt run alone (must be zero), the RSS of every
process (after warm-up, peak, final: memory must stay flat), and, once the server is idle,
the KV blocks still held (leaked blocks: must be zero). A table on stdout, JSON with --out.

    python benchmark/soak.py --duration 180 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park. They",
           "One day, a big bird", "Tom had a red ball", "The sun was hot and"]
FAULT_MARKER = "Zebra quartz fault"
IDLE_GAUGES = ("shardgen_kv_blocks_used", "shardgen_queue_size", "shardgen_batch_current_size")


# ---------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marker_ids(tokenizer_path: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tokenizer(text)["input_ids"]
    return ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids


class Launcher:
    """shardgen-launcher as a subprocess on a free loopback port, its log in a file."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.faults:
            marker = _marker_ids(args.model_id, FAULT_MARKER)
            env["SHARDGEN_FAULT_INJECTION"] = f"error={','.join(map(str, marker))}"
        argv = [sys.executable, "-m", "shardgen.launcher", "--model-id", str(args.model_id),
                "--device", args.device, "--num-shard", str(args.num_shard),
                "--hostname", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                "--max-concurrent-requests", str(args.max_concurrent_requests),
                "--graceful-termination-timeout", "30", *args.launcher_arg]
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the launcher exited with {self.process.returncode}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server did not answer /health within {timeout_s} s")

    def processes(self) -> dict[str, psutil.Process]:
        """The launcher and its children by role: launcher, router, shard 0, shard 1..."""
        launcher = psutil.Process(self.process.pid)
        named = {"launcher": launcher}
        for child in launcher.children(recursive=True):
            command = " ".join(child.cmdline())
            if "shardgen.router" in command:
                named["router"] = child
            elif "shardgen.shard" in command:
                named[f"shard {child.environ().get('RANK', '?')}"] = child
        return named

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of /metrics, plus `requests_total{outcome}` as requests:OUTCOME."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name == "shardgen_requests_total":
                values[f"requests:{sample.labels['outcome']}"] = sample.value
    return values


def wait_idle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(url)
        if all(values.get(name, 0) == 0 for name in IDLE_GAUGES) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


# ---------------------------------------------------------------- memory


@dataclass
class MemoryWatch:
    """RSS of every process sampled every second on a thread: warm, peak and final MiB."""

    processes: dict[str, psutil.Process]
    warm_after_s: float
    warm: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[str, float]:
        rss = {}
        for name, process in self.processes.items():
            try:
                rss[name] = process.memory_info().rss / 2**20
            except psutil.Error:
                continue
        return rss

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            rss = self._sample()
            for name, mib in rss.items():
                self.peak[name] = max(self.peak.get(name, 0.0), mib)
            if not self.warm and time.monotonic() - self._started >= self.warm_after_s:
                self.warm = rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.final = self._sample()


# ---------------------------------------------------------------- the clients


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    tokens: int = 0
    mismatches: int = 0
    # Requests without a fault marker that failed with a shard step (--faults).
    collateral: int = 0
    unexpected: list[str] = field(default_factory=list)


class Mix:
    """Draws the next request and knows what it should get back."""

    def __init__(self, args: argparse.Namespace, expected: dict[str, list[int]]) -> None:
        self.args = args
        self.expected = expected
        kinds = {"stream": 40, "generate": 15, "sampled": 10, "stop": 10, "completions": 10,
                 "deadline": 5, "malformed": 5}
        if args.faults:
            kinds["fault"] = 2
        self.kinds, self.weights = zip(*kinds.items())

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.kinds, self.weights)[0]


async def _stream(http: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str],
                  hang_up_after: int | None) -> tuple[int, list[dict]]:
    """Status and events of a /generate_stream call (closing early when asked)."""
    async with http.post(f"{url}/generate_stream", json=body, headers=headers) as response:
        if response.status != 200:
            return response.status, [await response.json(content_type=None)]
        events = []
        async for line in response.content:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                if hang_up_after is not None and len(events) >= hang_up_after:
                    response.close()
                    return 200, events + [{"hung_up": True}]
        return 200, events


async def one_request(http: aiohttp.ClientSession, url: str, kind: str, rng: random.Random,
                      mix: Mix, tally: Tally) -> None:
    prompt = rng.choice(PROMPTS)
    length = rng.randint(8, mix.args.max_new_tokens)
    status, outcome, ids = 0, "", None
    if kind in ("stream", "deadline"):
        deadline = kind == "deadline"
        hang_up = (rng.randint(1, 4) if not deadline and rng.random() < mix.args.disconnect_rate
                   else None)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 400 if deadline else length,
                                                 "ignore_eos": deadline}}
        headers = {"x-request-timeout": "0.3"} if deadline else {}
        status, events = await _stream(http, url, body, headers, hang_up)
        last = events[-1] if events else {}
        tally.tokens += sum(1 for event in events if "token" in event)
        if last.get("hung_up"):
            outcome = "client hung up"
        elif status == 200 and "error" in last:
            outcome = f"stream error: {last['error_type']}"
        elif status == 200:
            outcome, ids = "ok", [event["token"]["id"] for event in events]
        else:
            outcome = f"{status} {last.get('error_type')}"
    else:
        path, body = _whole_request(kind, prompt, length, rng)
        async with http.post(f"{url}{path}", json=body) as response:
            status, answer = response.status, await response.json(content_type=None)
        outcome = "ok" if status == 200 else f"{status} {answer.get('error_type')}"
        if status == 200 and kind == "generate":
            ids = [token["id"] for token in answer["details"]["tokens"]]
            tally.tokens += len(ids)
    tally.kinds[kind] += 1
    tally.outcomes[outcome] += 1
    if status == 429:
        # As a well-behaved client would: back off before trying again.
        await asyncio.sleep(rng.uniform(0.2, 1.0))
    if ids is not None and ids != mix.expected[prompt][:len(ids)]:
        tally.mismatches += 1
    if kind != "fault" and outcome in _STEP_FAILURES:
        tally.collateral += 1
    if not _expected_outcome(kind, outcome, mix.args.faults):
        tally.unexpected.append(f"{kind}: {outcome}")


def _whole_request(kind: str, prompt: str, length: int, rng: random.Random) -> tuple[str, dict]:
    """(route, body) of the non-streaming kinds."""
    if kind == "completions":
        return "/v1/completions", {"prompt": prompt, "max_tokens": length,
                                   "temperature": 0.8, "seed": rng.getrandbits(32)}
    parameters: dict[str, object] = {"max_new_tokens": length}
    if kind == "generate":
        parameters["details"] = True
    elif kind == "sampled":
        parameters.update(do_sample=True, temperature=0.9, top_p=0.9, seed=rng.getrandbits(32))
    elif kind == "stop":
        parameters["stop"] = [rng.choice([" the", ".", "and", "\n"])]
    elif kind == "malformed":
        parameters = rng.choice([{"max_new_tokens": -1}, {"temperature": "hot"},
                                 {"stop": ["x"] * 50}, {"top_p": 2.0}])
    elif kind == "fault":
        prompt = FAULT_MARKER
    return "/generate", {"inputs": prompt, "parameters": parameters}


_STEP_FAILURES = ("424 generation", "stream error: generation")


def _expected_outcome(kind: str, outcome: str, faults: bool) -> bool:
    """Whether an outcome is one the mix calls for. 429 is always fair: the load is higher
    than the server admits. With faults, a request may fail with faulty ones when it
    was a suspect of two failed steps that did not show which request was at fault (424, or
    an error event mid-stream; docs/reliability.md), which is rare."""
    if outcome.startswith("429 overloaded"):
        return True
    if faults and outcome in _STEP_FAILURES:
        return True
    allowed = {"malformed": ("422 validation",), "fault": ("424 generation",),
               "deadline": ("504 timeout", "stream error: timeout"),
               "stream": ("ok", "client hung up")}.get(kind, ("ok",))
    return outcome in allowed


async def run_clients(args: argparse.Namespace, url: str, mix: Mix) -> tuple[Tally, float]:
    tally = Tally()
    stop_at = time.monotonic() + args.duration
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < stop_at:
                kind = mix.draw(rng)
                try:
                    await one_request(http, url, kind, rng, mix, tally)
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    tally.kinds[kind] += 1
                    tally.outcomes[f"client error: {type(error).__name__}"] += 1
                    tally.unexpected.append(f"{kind}: {type(error).__name__}: {error}")

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    return tally, time.monotonic() - started


# ---------------------------------------------------------------- report


def summarize(args: argparse.Namespace, tally: Tally, elapsed_s: float, memory: MemoryWatch,
              idle: dict[str, float], exit_code: int) -> dict:
    served = sum(count for outcome, count in tally.outcomes.items()
                 if outcome in ("ok", "client hung up"))
    return {
        "duration_s": round(elapsed_s, 1),
        "concurrency": args.concurrency,
        "max_concurrent_requests": args.max_concurrent_requests,
        "requests": sum(tally.outcomes.values()),
        "served": served,
        "requests_per_s": round(sum(tally.outcomes.values()) / elapsed_s, 2),
        "streamed_or_generated_tokens": tally.tokens,
        "kinds": dict(tally.kinds),
        "outcomes": dict(tally.outcomes.most_common()),
        "unexpected": len(tally.unexpected),
        "unexpected_examples": tally.unexpected[:10],
        "greedy_mismatches": tally.mismatches,
        "collateral_failures": tally.collateral,
        "rss_mib": {name: {"warm": round(memory.warm.get(name, 0.0), 1),
                           "peak": round(memory.peak.get(name, 0.0), 1),
                           "final": round(memory.final.get(name, 0.0), 1)}
                    for name in memory.processes},
        "leaked_blocks": idle.get("shardgen_kv_blocks_used", -1),
        "idle": {name: idle.get(name, -1) for name in IDLE_GAUGES},
        "cached_blocks_idle": idle.get("shardgen_kv_blocks_cached", -1),
        "server_counted": {k.split(":", 1)[1]: v for k, v in idle.items()
                           if k.startswith("requests:")},
        "launcher_exit_code": exit_code,
    }


def print_table(summary: dict) -> None:
    print(f"\nSoak: {summary['duration_s']} s, {summary['concurrency']} clients, "
          f"max-concurrent-requests {summary['max_concurrent_requests']}")
    print(f"requests {summary['requests']} ({summary['requests_per_s']}/s), served "
          f"{summary['served']}, tokens {summary['streamed_or_generated_tokens']}")
    print("\n| outcome | count |\n| --- | --- |")
    for outcome, count in summary["outcomes"].items():
        print(f"| {outcome} | {count} |")
    print("\n| process | RSS after warm-up MiB | peak MiB | final MiB |\n| --- | --- | --- | --- |")
    for name, rss in summary["rss_mib"].items():
        print(f"| {name} | {rss['warm']} | {rss['peak']} | {rss['final']} |")
    print(f"\nunexpected outcomes: {summary['unexpected']} {summary['unexpected_examples']}")
    print(f"greedy answers unlike the solo run: {summary['greedy_mismatches']}")
    print(f"requests without a fault marker failed with a step: "
          f"{summary['collateral_failures']}")
    print(f"leaked KV blocks when idle: {summary['leaked_blocks']} (idle gauges "
          f"{summary['idle']}); launcher exit code {summary['launcher_exit_code']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-id", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-shard", type=int, default=1)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=48, help="clients sending at once")
    p.add_argument("--max-concurrent-requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest normal request")
    p.add_argument("--disconnect-rate", type=float, default=0.2,
                   help="share of streams whose client hangs up after 1-4 tokens")
    p.add_argument("--faults", action="store_true",
                   help="also send prompts that make the shard's step fail (fault injection)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher-arg", action="append", default=[],
                   help="extra launcher argument (repeat: --launcher-arg=--kv-cache-bytes ...)")
    p.add_argument("--log", type=Path, default=Path("soak-launcher.log"))
    p.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    launcher = Launcher(args, args.log)
    try:
        launcher.wait_ready(600)
        expected = {}
        for prompt in PROMPTS:  # each greedy prompt alone, the reference of the mix
            answer = requests.post(f"{launcher.url}/generate", timeout=120, json={
                "inputs": prompt, "parameters": {"max_new_tokens": args.max_new_tokens,
                                                 "details": True}}).json()
            expected[prompt] = [token["id"] for token in answer["details"]["tokens"]]
        memory = MemoryWatch(launcher.processes(), warm_after_s=min(30.0, args.duration / 4))
        tally, elapsed = asyncio.run(run_clients(args, launcher.url, Mix(args, expected)))
        idle = wait_idle(launcher.url)
        memory.stop()
    finally:
        exit_code = launcher.stop()
    summary = summarize(args, tally, elapsed, memory, idle, exit_code)
    print_table(summary)
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
