#!/usr/bin/env python3
"""Memory per rank under tensor parallelism: each shard's parameter bytes and RSS.

For each N in --shards, loads one random Llama checkpoint with N ranks over gloo (one
process per rank, as the launcher starts shards on CPU, through the same
`init_distributed` and `load_model`) and reports, per rank: the bytes of its parameters,
its resident memory before and after loading, the anonymous part of it (what the weights
occupy once the checkpoint's file mapping is closed), and the peak during the load; each
with its ratio to N = 1. The default shape (hidden 1024, 8 layers, vocab 32000, float32:
about 0.6 GB of weights) makes the weights dominate the ~0.3 GB a process spends on
importing torch.

  python benchmark/tp_memory.py --shards 1 2 4 --out tp_memory.json

Linux only: RSS comes from /proc/self/status (VmRSS, RssAnon, VmHWM reset by clear_refs).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from make_random_model import tensor_shapes
from transformers import AutoConfig

from shardgen.shard.distributed import TensorParallelGroup, destroy_distributed, init_distributed
from shardgen.shard.models import get_model_class, load_model

MiB = 2**20


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory, in bytes."""

    world_size: int
    rank: int
    param_bytes: int       # this rank's parameters (a tied weight counted once)
    buffer_bytes: int      # non-parameter tensors (rotary tables)
    rss_before: int        # everything imported and the group joined, no weight loaded
    rss_after: int         # the model loaded and the checkpoint closed
    rss_anon_after: int    # the anonymous (heap) part of rss_after
    rss_peak_load: int     # the high-water mark while loading
    load_s: float


def model_config(args: argparse.Namespace) -> dict:
    """config.json of the random Llama."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": args.dtype,
    }


def write_random_checkpoint(folder: Path, config: dict, dtype: torch.dtype, seed: int = 0) -> int:
    """config.json and one model.safetensors of random weights; returns the weight bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _proc_status() -> dict[str, int]:
    """The kB fields of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0), so the peak is the load's own.
    Path("/proc/self/clear_refs").write_text("5")


def _import_everything(model_path: str, rank: int, world_size: int) -> None:
    """Builds this rank's model on the meta device, allocating nothing.

    Parsing config.json imports much of transformers (~150 MiB of RSS); a shard pays that
    before it loads anything, so it belongs in the baseline, not in the load's delta.
    """
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        get_model_class(config.architectures[0])(config, TensorParallelGroup(rank, world_size))


def _measure_rank(rank: int, world_size: int, model_path: str, dtype: str, port: int,
                  out_dir: str) -> None:
    """One rank: join the group, load its slice, write its RankMemory as JSON."""
    torch.set_num_threads(1)
    init_distributed(rank, world_size, "127.0.0.1", port, torch.device("cpu"), timeout_s=300)
    try:
        _import_everything(model_path, rank, world_size)
        before = _proc_status()
        _reset_peak_rss()
        start = time.perf_counter()
        model = load_model(model_path, dtype=getattr(torch, dtype), device=torch.device("cpu"),
                           rank=rank, world_size=world_size)
        load_s = time.perf_counter() - start
        after = _proc_status()
        result = RankMemory(
            world_size=world_size, rank=rank,
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            rss_before=before["VmRSS"], rss_after=after["VmRSS"],
            rss_anon_after=after["RssAnon"], rss_peak_load=after["VmHWM"], load_s=load_s)
        Path(out_dir, f"{world_size}-{rank}.json").write_text(json.dumps(asdict(result)))
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(model_path: Path, world_size: int, dtype: str) -> list[RankMemory]:
    """Every rank's memory with the model split `world_size` ways."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_measure_rank, args=(world_size, str(model_path), dtype, _free_port(), out_dir),
                 nprocs=world_size, join=True)
        return [RankMemory(**json.loads(Path(out_dir, f"{world_size}-{rank}.json").read_text()))
                for rank in range(world_size)]


_COLUMNS = ("N", "rank", "params MiB", "×N=1", "RSS before MiB", "RSS after MiB", "×N=1",
            "anon MiB", "×N=1", "loaded ΔRSS MiB", "×N=1", "peak in load MiB", "load s")


def _row(r: RankMemory, solo: RankMemory) -> list[str]:
    delta, solo_delta = r.rss_after - r.rss_before, solo.rss_after - solo.rss_before
    return [str(r.world_size), str(r.rank),
            f"{r.param_bytes / MiB:.1f}", f"{r.param_bytes / solo.param_bytes:.3f}",
            f"{r.rss_before / MiB:.0f}",
            f"{r.rss_after / MiB:.0f}", f"{r.rss_after / solo.rss_after:.3f}",
            f"{r.rss_anon_after / MiB:.0f}", f"{r.rss_anon_after / solo.rss_anon_after:.3f}",
            f"{delta / MiB:.0f}", f"{delta / solo_delta:.3f}",
            f"{r.rss_peak_load / MiB:.0f}", f"{r.load_s:.1f}"]


def table(rows: list[RankMemory]) -> str:
    """Markdown table: each rank's figures in MiB, with ratios to the N = 1 run."""
    solo = next(r for r in rows if r.world_size == 1)
    lines = [_COLUMNS, ["---"] * len(_COLUMNS), *(_row(r, solo) for r in rows)]
    return "\n".join(f"| {' | '.join(cells)} |" for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4],
                        help="Tensor-parallel sizes to measure (1 is always added: ratios need it).")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=None, help="Write the rows and the setup as JSON.")
    args = parser.parse_args()

    config = model_config(args)
    with tempfile.TemporaryDirectory(prefix="tp-memory-") as folder:
        weight_bytes = write_random_checkpoint(Path(folder), config, getattr(torch, args.dtype))
        print(f"random Llama: {weight_bytes / MiB:.0f} MiB of {args.dtype} weights", file=sys.stderr)
        rows = [row for n in sorted({1, *args.shards}) for row in measure(Path(folder), n, args.dtype)]
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({
            "command": " ".join(sys.argv), "config": config, "checkpoint_bytes": weight_bytes,
            "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
