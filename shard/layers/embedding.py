"""Vocabulary-parallel token embedding and output head.

Rank r holds vocabulary rows [r*P, (r+1)*P) with P = ceil(vocab_size / N); rows past
vocab_size (the padding of an uneven vocabulary) are zero. The embedding looks up the
ids it owns and all-reduces; the head all-gathers its logits and drops the padding, so
every rank ends with the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.weights import TensorSlice, check_shape


class VocabParallelEmbedding(nn.Module):
    """Token embedding split over ranks by vocabulary rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // tp.world_size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows this rank takes from the checkpoint; the last rank may get fewer (or none).
        self.rows_loaded = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice) -> None:
        check_shape(loaded, [self.num_embeddings, param.shape[1]])
        n = self.rows_loaded
        if n:
            param.data[:n].copy_(loaded[self.vocab_start:self.vocab_start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.rows_per_rank)
        # Ids of other ranks look up row 0 and are zeroed, so the sum over ranks is exact.
        hidden = F.embedding(local * owned, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split by vocabulary rows; logits gathered on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[N, hidden] -> [N, vocab_size] float32 logits over the full vocabulary."""
        logits = self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[:, :self.num_embeddings].float()
