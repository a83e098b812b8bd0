"""Helpers of the shard tests: a real shard server in-process or as processes, and a
minimal router.

`InProcessShard` runs the production servicer and interceptor on a unix socket from a
background event loop; tests talk to it with a plain synchronous gRPC stub, exactly as
any client would. `MiniRouter` plays the router's part of the contract: it hands out
blocks lazily (extending block tables when a decode crosses a block boundary), builds
Requests with slots, and drives Prefill/Decode.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from shardgen.proto import generate_pb2, generate_pb2_grpc
from shardgen.shard.config import ShardConfig, parse_config
from shardgen.shard.main import build_runner
from shardgen.shard.runner import ModelRunner
from shardgen.shard.server import ShardServicer, serve_until

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
BLOCK_SIZE = 16


def shard_config(uds_path: str, *flags: str) -> ShardConfig:
    return parse_config(["--model-id", str(STORIES), "--uds-path", uds_path, "--device", "cpu",
                         *flags], {}, cuda_available=False)


class InProcessShard:
    """The shard's servicer on a unix socket, served from a thread's event loop."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.runner: ModelRunner = build_runner(config)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shard-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the in-process shard did not start")
        self.channel = grpc.insecure_channel(config.address)
        self.stub = generate_pb2_grpc.TextGenerationServiceStub(self.channel)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._loop.call_soon(self._ready.set)
            await serve_until(self._stop, ShardServicer(self.runner, self.config), self.config,
                              grace_s=1.0)

        self._loop.run_until_complete(main())

    def close(self) -> None:
        self.channel.close()
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextmanager
def running_shard(*flags: str) -> Iterator[InProcessShard]:
    folder = tempfile.mkdtemp(prefix="sg-")  # short: unix socket paths are limited to 107 bytes
    shard = InProcessShard(shard_config(f"{folder}/shard", *flags))
    try:
        yield shard
    finally:
        shard.close()
        shutil.rmtree(folder, ignore_errors=True)


def greedy(**overrides: object) -> generate_pb2.NextTokenChooserParameters:
    fields: dict[str, object] = dict(temperature=1.0, top_p=1.0, typical_p=1.0,
                                     repetition_penalty=1.0)
    fields.update(overrides)
    return generate_pb2.NextTokenChooserParameters(**fields)


@dataclass
class Sequence_:
    """The router-side view of one request."""

    request_id: int
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    finish_reason: int = 0


class MiniRouter:
    """Hands out blocks from a free list and drives the shard through the contract."""

    def __init__(self, stub: generate_pb2_grpc.TextGenerationServiceStub, num_blocks: int) -> None:
        self.stub = stub
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is reserved
        self.sequences: dict[int, Sequence_] = {}
        self.batch: generate_pb2.CachedBatch | None = None

    def _grow(self, seq: Sequence_, tokens: int) -> list[int]:
        new = []
        while len(seq.blocks) * BLOCK_SIZE < tokens:
            new.append(self.free.pop())
            seq.blocks.append(new[-1])
        return new

    def request(self, request_id: int, prompt: Sequence[int], *, max_new_tokens: int = 20,
                parameters: generate_pb2.NextTokenChooserParameters | None = None,
                cache_len: int = 0, chunk_len: int = 0, blocks: Sequence[int] = (),
                **fields: object) -> generate_pb2.Request:
        seq = self.sequences.setdefault(request_id, Sequence_(request_id, list(prompt), list(blocks)))
        # Slots run to the end of input_ids (whatever the chunk), so blocks cover it all.
        self._grow(seq, len(prompt))
        slots = [seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                 for p in range(cache_len, len(prompt))]
        return generate_pb2.Request(
            id=request_id, input_ids=list(prompt), parameters=parameters or greedy(),
            stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=max_new_tokens),
            blocks=seq.blocks, slots=slots, cache_len=cache_len, chunk_len=chunk_len, **fields)

    def _extensions(self) -> list[generate_pb2.BlockTableExtension]:
        """Blocks every running request needs for the token it computes next."""
        if self.batch is None:
            return []
        extensions = []
        for request_id in self.batch.request_ids:
            seq = self.sequences[request_id]
            new = self._grow(seq, len(seq.tokens) + len(seq.generated))
            if new:
                extensions.append(generate_pb2.BlockTableExtension(request_id=request_id, blocks=new))
        return extensions

    def _absorb(self, response: generate_pb2.PrefillResponse | generate_pb2.DecodeResponse
                ) -> list[generate_pb2.Generation]:
        for generation in response.generations:
            seq = self.sequences[generation.request_id]
            seq.generated.extend(generation.tokens.ids)
            seq.finish_reason = generation.finish_reason
        self.batch = response.batch if response.HasField("batch") else None
        return list(response.generations)

    def prefill(self, batch_id: int, requests: Sequence[generate_pb2.Request]
                ) -> list[generate_pb2.Generation]:
        response = self.stub.Prefill(generate_pb2.PrefillRequest(
            batch=generate_pb2.Batch(id=batch_id, requests=requests), cached_batch=self.batch,
            block_extensions=self._extensions()))
        return self._absorb(response)

    def decode(self) -> list[generate_pb2.Generation]:
        assert self.batch is not None
        response = self.stub.Decode(generate_pb2.DecodeRequest(
            batches=[self.batch], block_extensions=self._extensions()))
        return self._absorb(response)

    def run_to_completion(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if self.batch is None:
                return
            self.decode()
        raise AssertionError(f"still running after {max_steps} decode steps")


class Reference:
    """transformers on the same weights: the oracle of greedy tokens and log-probabilities."""

    def __init__(self) -> None:
        self.model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(STORIES)
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation; stops after an EOS id (1 or 2 for stories260K), like the shard."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:  # generate is slow on a busy CPU: once per prompt
            out = self.model.generate(torch.tensor([list(prompt)]), do_sample=False,
                                      max_new_tokens=max_new_tokens)
            self._greedy[key] = out[0, len(prompt):].tolist()
        return self._greedy[key]

    @torch.no_grad()
    def prompt_logprobs(self, prompt: Sequence[int]) -> list[float]:
        """log p(prompt[i] | prompt[:i]) for i >= 1."""
        logits = self.model(torch.tensor([list(prompt)])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        return logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()


# ---------------------------------------------------------------- shards as processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def shard_processes(world_size: int, *flags: str) -> Iterator[tuple[str, list[subprocess.Popen[bytes]], list[Path]]]:
    folder = Path(tempfile.mkdtemp(prefix="sg-"))
    uds = str(folder / "s")
    port = str(free_port())
    processes, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        logs.append(folder / f"rank{rank}.log")
        with open(logs[-1], "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "shardgen.shard", "--model-id", str(STORIES), "--uds-path",
                 uds, "--device", "cpu", *flags], env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield uds, processes, logs
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def shard_stub(uds: str, rank: int) -> generate_pb2_grpc.TextGenerationServiceStub:
    return generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{uds}-{rank}"))


def wait_healthy(uds: str, processes: list[subprocess.Popen[bytes]], logs: list[Path],
                  timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for rank, process in enumerate(processes):
        while True:
            assert process.poll() is None, logs[rank].read_text()
            if Path(f"{uds}-{rank}").exists():
                try:
                    shard_stub(uds, rank).Health(generate_pb2.HealthRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    pass
            assert time.monotonic() < deadline, logs[rank].read_text()
            time.sleep(0.1)
