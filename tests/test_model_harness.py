"""Helpers shared by the model tests: random HF checkpoints and a paged-cache step driver.

Imported by test_model_*.py and test_tensor_parallel_*.py (pytest puts tests/ on sys.path).
The driver plays the router's part: it gives each sequence random, non-contiguous blocks
and feeds the model steps of "n new tokens of sequence s", like Prefill and Decode do.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig

from shardgen.shard.layers.attention import make_attention_metadata
from shardgen.shard.models import CausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

# One step: (sequence index, number of new tokens) for each sequence in the batch.
Step = Sequence[tuple[int, int]]


def save_random_model(path: Path, config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """Saves a randomly initialised float32 model (safetensors) to `path`; returns it."""
    # Imported here: the model classes are slow to import, and tensor-parallel worker
    # processes import this module without needing them.
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.save_pretrained(path)
    return model.eval()


@torch.no_grad()
def reference_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """transformers' full forward of one sequence: [L] -> [L, vocab] float32."""
    return model(ids[None]).logits[0].float()


class PagedDriver:
    """Runs a CausalLM step by step over a paged KV cache with scattered blocks."""

    def __init__(
        self, model: CausalLM, sequences: Sequence[torch.Tensor], block_size: int = 4, seed: int = 0
    ) -> None:
        self.model = model
        self.sequences = [s.long() for s in sequences]
        self.block_size = block_size
        rng = random.Random(seed)
        needed = [-(-len(s) // block_size) for s in self.sequences]
        # Twice the blocks needed, shuffled: tables are neither contiguous nor ordered.
        free = list(range(1, 2 * sum(needed) + 2))  # block 0 is reserved padding
        rng.shuffle(free)
        self.block_tables = [[free.pop() for _ in range(n)] for n in needed]
        num_blocks = 2 * sum(needed) + 2
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        weight = next(model.parameters())
        self.device = weight.device
        # NaN everywhere: any read of a slot that was never written poisons the result.
        self.kv_caches = [
            tuple(torch.full(shape, float("nan"), dtype=weight.dtype, device=self.device) for _ in "kv")
            for _ in range(model.num_layers)
        ]
        self.cache_lens = [0] * len(self.sequences)
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.sequences]

    def share_prefix(self, source: int, target: int, num_blocks: int) -> None:
        """Makes `target` reuse the first blocks of `source` as its cached prefix (a prefix hit)."""
        prefix = self.sequences[source][: num_blocks * self.block_size]
        if not torch.equal(self.sequences[target][: len(prefix)], prefix):
            raise ValueError("the sequences do not share that prefix")
        self.block_tables[target][:num_blocks] = self.block_tables[source][:num_blocks]
        self.cache_lens[target] = num_blocks * self.block_size

    @torch.inference_mode()
    def step(self, step: Step) -> torch.Tensor:
        """Computes the given new tokens; returns their logits [T, vocab] in step order."""
        ids, positions = [], []
        for seq, n in step:
            start = self.cache_lens[seq]
            ids.append(self.sequences[seq][start:start + n])
            positions.append(torch.arange(start, start + n))
        attn = make_attention_metadata(
            [self.block_tables[seq] for seq, _ in step],
            [self.cache_lens[seq] for seq, _ in step],
            [n for _, n in step],
            self.block_size,
            self.device,
        )
        inputs = torch.cat(ids).to(self.device), torch.cat(positions).to(self.device)
        hidden = self.model(*inputs, self.kv_caches, attn)
        logits = self.model.compute_logits(hidden)
        for (seq, n), rows in zip(step, logits.split([n for _, n in step])):
            self.cache_lens[seq] += n
            self.logits[seq].append(rows)
        return logits

    def run(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """Runs every step; returns, per sequence, the logits of every token computed."""
        for step in steps:
            self.step(step)
        return [torch.cat(rows).cpu() if rows else torch.empty(0) for rows in self.logits]


def split_schedule(len_a: int, len_b: int) -> list[list[tuple[int, int]]]:
    """Two sequences taken in pieces: a prefix of A alone; A's next chunk (after its cached
    prefix) batched with B's first chunk; a decode of A batched with B's next chunk; then
    single-token decodes of both to the end. Needs len_a >= 9 and len_b >= 6."""
    if len_a < 9 or len_b < 6:
        raise ValueError(f"lengths {len_a}, {len_b} are too short for the schedule (9, 6)")
    return [[(0, 5)], [(0, len_a - 8), (1, 3)], [(0, 1), (1, len_b - 5)], [(0, 1), (1, 1)], [(0, 1), (1, 1)]]


def test_driver_blocks_are_scattered_and_private() -> None:
    class _Shape:
        num_kv_heads, head_dim, num_layers = 1, 2, 1

        def parameters(self):  # noqa: ANN202 - a stand-in for nn.Module.parameters
            yield torch.zeros(1)

    driver = PagedDriver(_Shape(), [torch.arange(13), torch.arange(9)], block_size=4)  # type: ignore[arg-type]
    tables = driver.block_tables
    used = [block for table in tables for block in table]
    assert [len(t) for t in tables] == [4, 3]
    assert 0 not in used and len(set(used)) == len(used)
    assert any(b - a != 1 for table in tables for a, b in zip(table, table[1:]))


def test_split_schedule_covers_each_sequence_exactly() -> None:
    steps = split_schedule(13, 9)
    assert [sum(n for step in steps for seq, n in step if seq == s) for s in (0, 1)] == [13, 9]
    assert steps[-1] == [(0, 1), (1, 1)]
