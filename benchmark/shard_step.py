#!/usr/bin/env python3
"""Prefill and decode step times of the real ModelRunner against the hardware floor (GPU).

Loads a checkpoint in-process (no gRPC, no router) into shardgen's ModelRunner with its
production settings (Triton kernels, decode CUDA graphs, KV cache sized by Warmup), and
drives it through Prefill and Decode messages the way the router does. For each batch
size B (default 1, 32, 128) at a context of C tokens (default 1024) it reports:

  prefill   median wall time of one Prefill call of B prompts of C tokens (split into
            calls of at most --max-prefill-tokens), next to its floor:
            max(FLOPs / bf16 (or fp8) matmul rate, weight bytes / bandwidth), with
            FLOPs = 2 * (linear weights) * tokens + 2 * lm_head * B (logits of the last
            token only) + 4 * layers * Hq * D * sum over prompts of L(L+1)/2 (causal QK, PV)
  decode    median wall time of one Decode call of B rows around context C, and the GPU
            time of the step (CUDA events around forward + sampling), next to its floor:
            (weight bytes read + KV bytes read) / bandwidth, with weight bytes excluding
            the embedding table (a decode reads B of its rows) and KV bytes =
            B * context * layers * 2 * Hkv * D * element size
  host gap  wall - GPU time: what the device waits for the host in a step
The bandwidth is that of a large device-to-device copy (bytes read + written), the matmul
rate that of an 8192^3 bf16 product on random data, both measured first. A table goes
to stdout and everything to JSON (--out). Timings are never asserted.

  python benchmark/make_random_model.py --tokenizer ../shared/tokenizers/llama3 --out /tmp/llama8b
  python benchmark/shard_step.py --model /tmp/llama8b --out results/shard_step.json
  python benchmark/shard_step.py --model /tmp/llama8b --check-tokens   # Triton+graphs vs torch
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardgen.proto import generate_pb2 as pb
from shardgen.shard.config import KV_CACHE_DTYPES, QUANTIZE_CHOICES
from shardgen.shard.cuda_graphs import GraphPolicy
from shardgen.shard.kv_cache import kv_cache_dtype
from shardgen.shard.layers.quant import fp8_linear, quantize_rows_fp8, quantize_weight_fp8
from shardgen.shard.models import CausalLM, load_model
from shardgen.shard.runner import MemoryPolicy, ModelFacts, ModelRunner

BLOCK_SIZE = 16


# ----------------------------------------------------------------------------- the hardware

def measure_bandwidth(device: torch.device, size_bytes: int = 4 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _median_event_time(lambda: dst.copy_(src), repeats=20)
    return 2 * size_bytes / seconds


def measure_matmul_rate(device: torch.device, n: int = 8192, fp8: bool = False) -> float:
    """FLOP/s of an n^3 bf16 matrix product on random data, or of the fp8 one --quantize fp8
    runs (torch._scaled_mm with row-wise scales, shard/layers/quant.py)."""
    a = torch.randn((n, n), device=device, dtype=torch.bfloat16)
    b = torch.randn((n, n), device=device, dtype=torch.bfloat16)
    if not fp8:
        return 2 * n**3 / _median_event_time(lambda: a @ b, repeats=20)
    (a8, scale_a), (b8, scale_b) = quantize_rows_fp8(a), quantize_weight_fp8(b)
    return 2 * n**3 / _median_event_time(
        lambda: fp8_linear(a8, scale_a, b8, scale_b, None, torch.bfloat16), repeats=20)


def _median_event_time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- the model's floors

@dataclass(frozen=True)
class Shapes:
    """What the floors need to know about the model."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    element_size: int
    kv_element_size: int    # 1 with --kv-cache-dtype fp8
    embedding_params: int
    lm_head_params: int
    linear_params: int      # every other weight (the layers' matmuls and norms)
    linear_bytes: int       # their bytes (1 per projection weight with --quantize fp8)

    @classmethod
    def of(cls, model: CausalLM, kv_element_size: int | None = None) -> Shapes:
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        tied = head.data_ptr() == embed.data_ptr()
        head_params = 0 if tied else head.numel()
        config = model.config
        return cls(model.num_layers, config.num_attention_heads, model.num_kv_heads, model.head_dim,
                   embed.element_size(), kv_element_size or embed.element_size(), embed.numel(), head.numel(),
                   total - embed.numel() - head_params,
                   total_bytes - (embed.numel() + head_params) * embed.element_size())

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.kv_element_size

    def decode_floor_s(self, batch: int, context: float, bandwidth: float) -> float:
        weights = self.linear_bytes + self.lm_head_params * self.element_size
        return (weights + batch * context * self.kv_bytes_per_token()) / bandwidth

    def prefill_floor_s(self, lengths: Sequence[int], matmul_rate: float, bandwidth: float) -> float:
        tokens = sum(lengths)
        attention = 4 * self.layers * self.q_heads * self.head_dim * sum(n * (n + 1) // 2 for n in lengths)
        flops = 2 * self.linear_params * tokens + 2 * self.lm_head_params * len(lengths) + attention
        weights = self.linear_bytes + self.lm_head_params * self.element_size
        return max(flops / matmul_rate, weights / bandwidth)


# ----------------------------------------------------------------------------- the router's part

class Driver:
    """Hands out blocks and drives a ModelRunner with Prefill and Decode messages."""

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner = runner
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is reserved
        self.blocks: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.batches: list[pb.CachedBatch] = []
        self.next_id = 0
        self.next_batch = 1
        self.calls: list[tuple[float, float]] = []   # (start, seconds) of each runner call

    def _grow(self, rid: int, tokens: int) -> list[int]:
        new = [self.free.pop() for _ in range(-(-tokens // BLOCK_SIZE) - len(self.blocks[rid]))]
        self.blocks[rid] += new
        return new

    def request(self, prompt: list[int], max_new_tokens: int, prefix_blocks: Sequence[int] = ()) -> pb.Request:
        """A new request; with prefix_blocks, its first len(prefix_blocks) * BLOCK_SIZE
        tokens are taken as cached there (as the router's prefix index hands them out)."""
        rid = self.next_id
        self.next_id += 1
        cached = len(prefix_blocks) * BLOCK_SIZE
        self.blocks[rid], self.length[rid], self.tokens[rid], self.logprobs[rid] = (
            list(prefix_blocks), len(prompt), [], [])
        self._grow(rid, len(prompt) + 1)   # and the slot of the token it samples (run-ahead)
        table = self.blocks[rid]
        return pb.Request(
            id=rid, input_ids=prompt, blocks=table, cache_len=cached,
            slots=[table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, len(prompt))],
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                     repetition_penalty=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens,
                                                              ignore_eos_token=True))

    def prefill(self, requests: list[pb.Request]) -> None:
        """One Prefill call of new requests only; its batch waits beside the others."""
        batch_id = self.next_batch
        self.next_batch += 1
        message = pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests))
        self._absorb(self._call(self.runner.prefill, message))

    def decode(self, run_ahead: bool = True) -> None:
        """One Decode call over every waiting batch (the shard merges them into one), asking
        the shard to run the next one ahead (it does when its --run-ahead policy says so)."""
        message = pb.DecodeRequest(batches=self.batches, block_extensions=self._extensions(), run_ahead=run_ahead)
        self._absorb(self._call(self.runner.decode, message, sync=False), replace=True)

    def mixed(self, requests: list[pb.Request]) -> None:
        """One Prefill call of new requests riding with one decode token of the cached batch."""
        (running,) = self.batches
        batch_id = self.next_batch
        self.next_batch += 1
        message = pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests), cached_batch=running,
                                    block_extensions=self._extensions())
        self._absorb(self._call(self.runner.prefill, message), replace=True)

    def keep(self, request_ids: Sequence[int], shared: Sequence[int] = ()) -> None:
        """FilterBatch down to request_ids (one cached batch); the others' blocks come back,
        except the `shared` ones (a prefix that other requests still use)."""
        (running,) = self.batches
        kept = set(request_ids)
        for rid in running.request_ids:
            if rid not in kept:
                self.free.extend(b for b in self.blocks.pop(rid) if b not in shared)
        self.batches = [self.runner.filter_batch(pb.FilterBatchRequest(batch_id=running.id,
                                                                        request_ids=list(request_ids)))]

    def _call(self, method: Callable[[object], object], message: object, sync: bool = True) -> object:
        """The runner's answer; its wall time alone (not this driver's) goes to `calls`.
        `sync` first waits for the device (a prefill's time is then its own)."""
        if sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        response = method(message)
        self.calls.append((started, time.perf_counter() - started))
        return response

    def _extensions(self) -> list[pb.BlockTableExtension]:
        out = []
        for rid in (r for batch in self.batches for r in batch.request_ids):
            new = self._grow(rid, self.length[rid] + 1)  # one position ahead, as the router does
            if new:
                out.append(pb.BlockTableExtension(request_id=rid, blocks=new))
        return out

    def _absorb(self, response: object, replace: bool = False) -> None:
        for generation in response.generations:
            if generation.tokens.ids:
                self.tokens[generation.request_id] += list(generation.tokens.ids)
                self.logprobs[generation.request_id] += list(generation.tokens.logprobs)
                self.length[generation.request_id] += 1
        if replace:
            self.batches = []
        if response.HasField("batch"):
            self.batches.append(response.batch)

    def clear(self) -> None:
        """Forget every request (the shard's batches too) and take their blocks back."""
        self.runner.clear_cache(None)
        for table in self.blocks.values():
            self.free.extend(table)
        self.blocks.clear()
        self.batches = []


def prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def build_runner(args: argparse.Namespace, backend: str, graphs: bool, num_blocks: int | None,
                 max_batch: int, max_total: int, dtype: torch.dtype = torch.bfloat16) -> ModelRunner:
    device = torch.device("cuda", 0)
    model = load_model(args.model, dtype=dtype, device=device, kernel_backend=backend, quantize=args.quantize)
    runner = ModelRunner(model, ModelFacts.read(args.model, model),
                         MemoryPolicy(BLOCK_SIZE, 0, num_blocks, args.memory_fraction),
                         device=device, dtype=dtype, graphs=GraphPolicy(graphs, max(max_batch, 1)),
                         run_ahead=not args.no_run_ahead,
                         kv_cache_dtype=kv_cache_dtype(args.kv_cache_dtype))
    runner.warmup(pb.WarmupRequest(max_batch_prefill_tokens=args.max_prefill_tokens,
                                   max_batch_size=max_batch, max_total_tokens=max_total))
    return runner


# ----------------------------------------------------------------------------- measurements

def time_prefill(driver: Driver, batch: int, args: argparse.Namespace, max_new: int) -> list[float]:
    """Seconds of each Prefill call of the last repeat's batch (earlier repeats are cleared)."""
    per_call = max(1, args.max_prefill_tokens // args.context)
    times: list[float] = []
    for repeat in range(args.prefill_repeats):
        driver.clear()
        for start in range(0, batch, per_call):
            chunk = prompts(min(per_call, batch - start), args.context, driver.runner.facts.vocab_size,
                            seed=repeat * 100003 + start)
            driver.prefill([driver.request(p, max_new) for p in chunk])
            times.append(driver.calls[-1][1])
    return times


class StepTimer:
    """CUDA events around the runner's forward + sampling: the GPU time of each step; and
    the host clock when the step reaches them (what came before is host work the GPU
    waited for)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.entered: list[float] = []
        self._compute = runner._compute

    def __enter__(self) -> StepTimer:
        def timed(*args: object, **kwargs: object) -> object:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.entered.append(time.perf_counter())
            start.record()
            out = self._compute(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        self.runner._compute = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runner._compute  # back to the class's method

    def gpu_seconds(self) -> list[float]:
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in self.events]


def time_decode(driver: Driver, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per step of back-to-back Decode calls in steady state (from one answer to
    the answer `steps` calls later, the driver's own bookkeeping included, as a router's
    would be), the median GPU time of a step, and the median host time from a call to its
    step's first kernel. With run-ahead, a call's kernels are the next step's."""
    for _ in range(warmup):
        driver.decode()
    driver.calls.clear()
    with StepTimer(driver.runner) as timer:
        started = time.perf_counter()
        for _ in range(steps):
            driver.decode()
        wall = (time.perf_counter() - started) / steps
    gpu = timer.gpu_seconds()
    before = [entered - started for entered, (started, _) in zip(timer.entered, driver.calls)]
    return {"wall_s": wall, "gpu_s": statistics.median(gpu),
            "host_before_s": statistics.median(before) if before else float("nan"),
            "call_s": statistics.median(s for _, s in driver.calls)}


def bench_batch(driver: Driver, shapes: Shapes, batch: int, args: argparse.Namespace,
                hw: dict[str, float]) -> dict[str, object]:
    max_new = args.decode_steps * (2 if args.compare_eager else 1) + args.warmup_steps + 4
    prefill = time_prefill(driver, batch, args, max_new)
    per_call = min(batch, max(1, args.max_prefill_tokens // args.context))
    prefill_floor = shapes.prefill_floor_s([args.context] * per_call, hw["matmul_flops"], hw["bandwidth"])
    row: dict[str, object] = {
        "batch": batch, "context": args.context, "prefill_seqs_per_call": per_call,
        "prefill_s": statistics.median(prefill), "prefill_floor_s": prefill_floor,
        "prefill_calls_s": prefill}
    context = args.context + args.warmup_steps + args.decode_steps / 2
    decode = time_decode(driver, args.decode_steps, args.warmup_steps)
    row |= {"decode_wall_s": decode["wall_s"], "decode_gpu_s": decode["gpu_s"], "decode_call_s": decode["call_s"],
            "run_ahead": driver.runner.run_ahead,
            "decode_host_before_s": decode["host_before_s"],
            "decode_floor_s": shapes.decode_floor_s(batch, context, hw["bandwidth"]),
            "decode_mean_context": context, "decode_graphs": driver.runner.graphs is not None}
    if args.compare_eager and driver.runner.graphs is not None:
        graphs, driver.runner.graphs = driver.runner.graphs, None
        eager = time_decode(driver, args.decode_steps, 1)
        driver.runner.graphs = graphs
        row |= {"eager_decode_wall_s": eager["wall_s"], "eager_decode_gpu_s": eager["gpu_s"]}
    driver.clear()
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    ms = 1e3
    print(f"{'B':>4} {'ctx':>5} | {'prefill ms':>10} {'floor':>8} {'x':>5} | {'decode ms':>9} {'gpu ms':>7} "
          f"{'host ms':>7} {'before':>6} {'floor':>6} {'x':>5} {'gpu x':>5} | {'eager ms':>8}")
    for r in rows:
        wall, gpu, floor = r["decode_wall_s"], r["decode_gpu_s"], r["decode_floor_s"]
        eager = r.get("eager_decode_wall_s")
        print(f"{r['batch']:>4} {r['context']:>5} | {r['prefill_s'] * ms:>10.2f} {r['prefill_floor_s'] * ms:>8.2f} "
              f"{r['prefill_s'] / r['prefill_floor_s']:>5.2f} | {wall * ms:>9.3f} {gpu * ms:>7.3f} "
              f"{(wall - gpu) * ms:>7.3f} {r['decode_host_before_s'] * ms:>6.3f} {floor * ms:>6.3f} "
              f"{wall / floor:>5.2f} {gpu / floor:>5.2f} | "
              f"{eager * ms if eager else float('nan'):>8.3f}")


def check_tokens(args: argparse.Namespace) -> dict[str, object]:
    """Greedy tokens of Triton + graphs against the torch path, same weights and dtype."""
    results = {}
    dtype = getattr(torch, args.check_dtype)
    for backend, graphs in (("triton", True), ("torch", False)):
        runner = build_runner(args, backend, graphs, num_blocks=1024, max_batch=8, max_total=512, dtype=dtype)
        driver = Driver(runner, 1024)
        batch = prompts(4, 100, runner.facts.vocab_size, seed=7)
        driver.prefill([driver.request(p, args.check_tokens) for p in batch])
        while driver.batches:
            driver.decode()
        results[backend] = ([driver.tokens[r] for r in range(4)], [driver.logprobs[r] for r in range(4)])
        del runner, driver
        torch.cuda.empty_cache()
    (fast, fast_lp), (ref, ref_lp) = results["triton"], results["torch"]
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(fast, ref)]
    first = max(abs(a[0] - b[0]) for a, b in zip(fast_lp, ref_lp))
    return {"dtype": args.check_dtype, "tokens_per_sequence": args.check_tokens,
            "identical_sequences": sum(x == y for x, y in zip(fast, ref)), "sequences": len(ref),
            "first_divergence": agree, "max_abs_first_logprob_diff": first}


def profile_eager(args: argparse.Namespace) -> dict[str, str]:
    """Host profiles (cProfile, by own time) of an eager prefill of one prompt and of eager
    decode steps of one row: where a step's launch overhead goes."""
    runner = build_runner(args, args.kernel_backend, False, num_blocks=512, max_batch=8,
                          max_total=args.context + 64)
    driver = Driver(runner, 512)

    def one_prompt(seed: int) -> list[pb.Request]:
        return [driver.request(p, 32) for p in prompts(1, args.context, runner.facts.vocab_size, seed)]

    def prefill_again() -> None:
        driver.clear()
        driver.prefill(one_prompt(2))

    driver.prefill(one_prompt(1))  # compiles what the steps need
    for _ in range(3):
        driver.decode()
    report = {"prefill": _profiled(driver, 1, prefill_again), "decode": _profiled(driver, 5, driver.decode)}
    for text in report.values():
        print(text[:6000])
    return report


def profile_kernels(args: argparse.Namespace) -> dict[str, object]:
    """GPU kernels of real steps (torch.profiler, CUDA activity): per batch size, the
    decode step's kernels grouped by name (microseconds per step, launches per step), their
    sum against the step's span on the device (first kernel start to last kernel end), and
    the same for one prefill of --profile-prefill-prompts prompts. What a fusion or a faster kernel would win."""

    batches = [int(b) for b in args.batch_sizes.split(",")]
    max_total = args.context + 64
    runner = build_runner(args, args.kernel_backend, not args.no_cuda_graphs, None, max(batches), max_total)
    driver = Driver(runner, runner.cache.num_blocks if runner.cache else 0)
    report: dict[str, object] = {}

    for batch in batches:
        driver.clear()
        for start in range(0, batch, 32):
            chunk = prompts(min(32, batch - start), args.context, runner.facts.vocab_size, seed=start)
            driver.prefill([driver.request(p, 48) for p in chunk])
        for _ in range(3):
            driver.decode()
        report[f"decode_b{batch}"] = kernels_of(driver.decode, 8)
    driver.clear()
    batch = prompts(args.profile_prefill_prompts, args.context, runner.facts.vocab_size, seed=99)
    driver.prefill([driver.request(p, 8) for p in batch])   # compiles what this shape needs
    driver.clear()
    report[f"prefill_{len(batch)}x{args.context}"] = kernels_of(
        lambda: driver.prefill([driver.request(p, 8) for p in batch]), 1)
    for name, result in report.items():
        print(f"== {name}: kernels {result['kernel_us_per_step']:.1f} us, span {result['span_us_per_step']:.1f} us, "
              f"{result['launches_per_step']:.0f} launches per step")
        for row in result["kernels"][:14]:
            print(f"   {row['us']:>9.1f} us  x{row['count']:<5.1f} {row['name']}")
    return report


def profile_mixed(args: argparse.Namespace) -> dict[str, object]:
    """A burst of cached questions while others decode, as in the shared-prefix load: the
    GPU kernels and wall time of one Prefill of --mixed-prompts prompts of --mixed-new
    tokens after a shared cached prefix of --mixed-prefix tokens, riding with the decode of
    --mixed-decodes requests at --context tokens; and of the two parts alone (the prompts
    without decodes, the decode without prompts). The prefix's K/V are left as allocated:
    attention reads them all the same, and no timing depends on their values."""

    decodes, count, prefix, new = args.mixed_decodes, args.mixed_prompts, args.mixed_prefix, args.mixed_new
    max_total = max(args.context, prefix + new) + 64
    runner = build_runner(args, args.kernel_backend, not args.no_cuda_graphs, None, max(decodes + count, 1),
                          max_total)
    driver = Driver(runner, runner.cache.num_blocks if runner.cache else 0)
    vocab = runner.facts.vocab_size
    for start in range(0, decodes, 32):
        chunk = prompts(min(32, decodes - start), args.context, vocab, seed=start)
        driver.prefill([driver.request(p, 256) for p in chunk])
    driver.decode(run_ahead=False)   # one cached batch of the decoding requests
    running = list(driver.batches[0].request_ids)
    shared = [driver.free.pop() for _ in range(prefix // BLOCK_SIZE)]
    questions = [prompts(1, prefix, vocab, seed=7)[0] + q for q in prompts(count, new, vocab, seed=8)]

    def mixed() -> None:
        driver.mixed([driver.request(q, 8, shared) for q in questions])
        driver.keep(running, shared)

    def prompts_alone() -> None:
        saved, driver.batches = driver.batches, []
        driver.prefill([driver.request(q, 8, shared) for q in questions])
        for batch in driver.batches:
            driver.runner.clear_cache(batch.id)
            for rid in batch.request_ids:
                driver.free.extend(b for b in driver.blocks.pop(rid) if b not in shared)
        driver.batches = saved

    def decode_alone() -> None:
        driver.decode(run_ahead=False)

    report: dict[str, object] = {"decodes": decodes, "context": args.context, "prompts": count,
                                 "prefix": prefix, "new_tokens": new}
    for name, step in (("mixed", mixed), ("prompts_alone", prompts_alone), ("decode_alone", decode_alone)):
        for _ in range(3):
            step()   # compiles and captures what the shape needs
        torch.cuda.synchronize()
        walls = []
        for _ in range(10):
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - started)
        kernels = kernels_of(step, 3)
        kernels["wall_ms_median"] = statistics.median(walls) * 1e3
        report[name] = kernels
        print(f"== {name}: wall {kernels['wall_ms_median']:.2f} ms, kernels {kernels['kernel_us_per_step']:.1f} us, "
              f"{kernels['launches_per_step']:.0f} launches per step")
        for row in kernels["kernels"][:12]:
            print(f"   {row['us']:>9.1f} us  x{row['count']:<5.1f} {row['name']}")
    return report


def kernels_of(step: Callable[[], None], steps: int) -> dict[str, object]:
    """GPU kernels of `steps` calls of step (torch.profiler, CUDA activity), per step: time
    by kernel name, their sum, the span from the first kernel's start to the last's end."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 0]
    by_name: dict[str, list[float]] = {}
    for event in events:
        by_name.setdefault(event.name[:90], []).append(event.device_time)
    span_us = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) if events else 0
    kernels = sorted(((name, sum(t) / steps, len(t) / steps) for name, t in by_name.items()),
                     key=lambda row: -row[1])
    return {"steps": steps, "kernel_us_per_step": sum(sum(t) for t in by_name.values()) / steps,
            "span_us_per_step": span_us / steps, "launches_per_step": len(events) / steps,
            "kernels": [{"name": n, "us": round(us, 2), "count": c} for n, us, c in kernels]}


def _profiled(driver: Driver, steps: int, step: Callable[[], None]) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    median = statistics.median(s for _, s in driver.calls[-steps:])
    return f"{steps} step(s), runner call median {median * 1e3:.1f} ms\n{text.getvalue()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint folder (bf16).")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--context", type=int, default=1024, help="Prompt tokens per sequence.")
    parser.add_argument("--decode-steps", type=int, default=32, help="Timed decode steps per batch.")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--max-prefill-tokens", type=int, default=32768, help="Tokens per Prefill call.")
    parser.add_argument("--kernel-backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--compare-eager", action="store_true", help="Also time decode without graphs.")
    parser.add_argument("--no-run-ahead", action="store_true",
                        help="Decode one step per call (the shard launches nothing ahead).")
    parser.add_argument("--memory-fraction", type=float, default=0.9)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="The KV cache's storage (fp8: e4m3, the floors count 1 byte per element).")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="Weights of the projections in fp8 (the floors count their bytes and the "
                             "fp8 matmul rate).")
    parser.add_argument("--check-tokens", type=int, default=0,
                        help="Instead: compare N greedy tokens of Triton+graphs with the torch path.")
    parser.add_argument("--check-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="Compute dtype of --check-tokens (weights are cast to it).")
    parser.add_argument("--profile-eager", action="store_true",
                        help="Instead: host profiles of an eager prefill and eager decode steps.")
    parser.add_argument("--profile-prefill-prompts", type=int, default=1,
                        help="Prompts of --context tokens in the prefill --profile-kernels profiles.")
    parser.add_argument("--profile-kernels", action="store_true",
                        help="Instead: GPU kernels of decode steps (per batch size) and of one prefill.")
    parser.add_argument("--profile-mixed", action="store_true",
                        help="Instead: kernels and wall time of cached questions riding with decodes.")
    parser.add_argument("--mixed-decodes", type=int, default=56, help="Decoding rows of --profile-mixed.")
    parser.add_argument("--mixed-prompts", type=int, default=8, help="New prompts of --profile-mixed.")
    parser.add_argument("--mixed-prefix", type=int, default=2048, help="Their shared cached prefix (tokens).")
    parser.add_argument("--mixed-new", type=int, default=129, help="Their tokens past the prefix.")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, object]
    if not torch.cuda.is_available():
        print("shard_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.profile_eager:
        report = {"profile_eager": profile_eager(args)}
    elif args.profile_mixed:
        report = {"profile_mixed": profile_mixed(args)}
    elif args.profile_kernels:
        report = {"profile_kernels": profile_kernels(args)}
    elif args.check_tokens:
        report = {"check_tokens": check_tokens(args)}
        print(json.dumps(report, indent=1))
    else:
        device = torch.device("cuda", 0)
        fp8 = args.quantize == "fp8"
        hw = {"bandwidth": measure_bandwidth(device), "matmul_flops": measure_matmul_rate(device, fp8=fp8)}
        print(f"{torch.cuda.get_device_name()}: copy {hw['bandwidth'] / 1e9:.0f} GB/s, "
              f"{'fp8' if fp8 else 'bf16'} matmul {hw['matmul_flops'] / 1e12:.0f} TFLOP/s")
        batches = [int(b) for b in args.batch_sizes.split(",")]
        max_total = args.context + 2 * args.decode_steps + args.warmup_steps + 16
        runner = build_runner(args, args.kernel_backend, not args.no_cuda_graphs, None, max(batches), max_total)
        shapes = Shapes.of(runner.model, runner.spec.dtype.itemsize)
        driver = Driver(runner, runner.cache.num_blocks if runner.cache else 0)
        rows = [bench_batch(driver, shapes, b, args, hw) for b in batches]
        print_table(rows)
        report = {"device": torch.cuda.get_device_name(), "hardware": hw, "shapes": shapes.__dict__,
                  "kernel_ops": runner.model.ops.name, "num_blocks": driver.runner.cache.num_blocks
                  if driver.runner.cache else 0, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
