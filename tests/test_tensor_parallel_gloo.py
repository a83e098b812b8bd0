"""Tensor parallelism for real: N processes over gloo give the logits of one process.

The models have an uneven vocabulary (509 over 2 and 4 ranks), fewer KV heads than 4
ranks (replication), and biases on every projection (the row-parallel bias must be added
once). One spawn of 4 processes serves both sizes: world 4 is the default group, world 2
runs on the sub-groups {0, 1} and {2, 3}, which also exercises an explicit process group.
With `--quantize fp8` each rank quantizes its own slices (a row-parallel rank scales its
part of each input row), so two ranks come near one process, not equal to it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_model_harness import PagedDriver, save_random_model, split_schedule
from transformers import LlamaConfig

from shardgen.shard.distributed import TensorParallelGroup, destroy_distributed, init_distributed
from shardgen.shard.models import load_model

WORLD = 4
BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=509, max_position_embeddings=32, attention_bias=True, mlp_bias=True, initializer_range=0.2,
)
CONFIGS = {
    "untied-gqa": dict(BASE),
    "tied-mqa": {**BASE, "num_key_value_heads": 1, "tie_word_embeddings": True},
}


FP8_MODEL = "untied-gqa"


def _sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 509, (n,), generator=generator) for n in (17, 11)]


def _run(path: Path, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
         quantize: str | None = None) -> list[torch.Tensor]:
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"),
                       rank=rank, world_size=world_size, process_group=group, quantize=quantize)
    return PagedDriver(model, _sequences(), block_size=4, seed=9).run(split_schedule(17, 11))


def _worker(rank: int, models: dict[str, Path], port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    world = init_distributed(rank, WORLD, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    try:
        # Every rank must create every group, in the same order.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for name, path in models.items():
            torch.save(_run(path, rank, WORLD, world), out_dir / f"{name}-{WORLD}-{rank}.pt")
            torch.save(_run(path, rank % 2, 2, pairs[rank // 2]), out_dir / f"{name}-2-{rank}.pt")
        torch.save(_run(models[FP8_MODEL], rank % 2, 2, pairs[rank // 2], quantize="fp8"),
                   out_dir / f"{FP8_MODEL}-fp8-2-{rank}.pt")
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[torch.Tensor]]]:
    """(folder of every rank's logits, the single-process logits of each model)."""
    root = tmp_path_factory.mktemp("tp")
    models = {name: root / name for name in CONFIGS}
    for name, path in models.items():
        save_random_model(path, LlamaConfig(**CONFIGS[name]))
    mp.spawn(_worker, args=(models, _free_port(), root), nprocs=WORLD, join=True)
    expected = {name: _run(path) for name, path in models.items()}
    expected[f"{FP8_MODEL}-fp8"] = _run(models[FP8_MODEL], quantize="fp8")
    return root, expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_world_matches_single_process(runs, name: str, world_size: int) -> None:
    root, expected = runs
    for rank in range(WORLD):
        logits = torch.load(root / f"{name}-{world_size}-{rank}.pt")
        for ours, reference in zip(logits, expected[name], strict=True):
            assert ours.shape == reference.shape  # the full vocabulary on every rank
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
def test_fp8_world_of_two_is_near_one_process(runs) -> None:
    root, expected = runs
    per_rank = [torch.load(root / f"{FP8_MODEL}-fp8-2-{rank}.pt") for rank in range(WORLD)]
    for rank in range(1, WORLD):   # both groups, both ranks of each: the same logits
        for ours, first in zip(per_rank[rank], per_rank[0], strict=True):
            assert torch.equal(ours, first)
    quantized, unquantized = expected[f"{FP8_MODEL}-fp8"], expected[FP8_MODEL]
    for ours, reference, exact in zip(per_rank[0], quantized, unquantized, strict=True):
        assert ours.shape == reference.shape
        # Each way of quantizing errs by as much as the other, and less from the other than from exact.
        single_error = (reference - exact).abs().mean()
        assert single_error > 0   # the single process did quantize
        assert (ours - exact).abs().mean() < 1.25 * single_error
        assert (ours - reference).abs().mean() < single_error


def test_single_process_needs_no_group() -> None:
    assert init_distributed(0, 1, "127.0.0.1", 1, torch.device("cpu"), timeout_s=1) is None
    solo = TensorParallelGroup()
    x = torch.randn(3, 4)
    assert solo.all_reduce(x) is x and solo.all_gather(x) is x


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_or_world_size_is_refused(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=str(world_size if world_size < 1 else rank)):
        init_distributed(rank, world_size, "127.0.0.1", 1, torch.device("cpu"), timeout_s=1)
