"""The tensor-parallel process group of the shards and the two collectives the model needs.

Every shard process calls `init_distributed` once at start-up; the model layers then talk
to their peers only through a `TensorParallelGroup`, which turns every collective into a
no-op when the model runs on one rank (so a single-shard server never touches
torch.distributed at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    timeout_s: float,
) -> ProcessGroup | None:
    """Joins the group of `world_size` shards and returns it, or None for a single shard.

    NCCL on CUDA (one GPU per rank: `device` must be that rank's GPU), gloo on CPU. The
    rendezvous is a TCP store at master_addr:master_port hosted by rank 0; every rank
    waits at most `timeout_s` for the others, here and in every later collective.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size == 1:
        return None
    timeout = timedelta(seconds=timeout_s)
    init_method = f"tcp://{_host_for_url(master_addr)}:{master_port}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # device_id binds the communicator to this GPU eagerly, so a mis-mapped rank
        # fails here rather than inside the first forward pass.
        dist.init_process_group(
            "nccl", init_method=init_method, rank=rank, world_size=world_size,
            timeout=timeout, device_id=device,
        )
    else:
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
        )
    return dist.group.WORLD


def destroy_distributed() -> None:
    """Leaves the process group if this process joined one (safe to call when it did not)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _host_for_url(addr: str) -> str:
    # A bare IPv6 address needs brackets inside a tcp:// URL.
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place in the tensor-parallel group, and the collectives over it.

    `group` None means torch.distributed's default group when world_size > 1; with
    world_size 1 no collective is ever issued, so torch.distributed need not be set up.
    """

    rank: int = 0
    world_size: int = 1
    group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` (same shape on all ranks) along `dim`, rank order."""
        if self.world_size == 1:
            return x
        # The list form works on gloo and NCCL alike; this runs once per step on the
        # logits of the sampled rows only, so the extra concatenation is cheap.
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)
