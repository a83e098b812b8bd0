"""The fused Triton draw against the torch path (Triton interpreter on CPU, or a GPU)."""

from __future__ import annotations


import pytest
import torch

from shardgen.shard.sampling import draw_keys, gumbel_argmax

from kernel_env import DEVICE, needs_kernels  # noqa: E402

pytestmark = needs_kernels


@pytest.mark.parametrize("rows, vocab", [(1, 7), (5, 3000), (3, 4096)])
def test_fused_draw_picks_what_the_torch_path_picks(rows: int, vocab: int) -> None:
    from shardgen.shard.sampling_kernel import gumbel_argmax as fused

    generator = torch.Generator().manual_seed(rows * vocab)
    scores = (torch.randn(rows, vocab, generator=generator) * 2).to(DEVICE)
    scores[:, ::3] = float("-inf")  # filtered tokens are never drawn
    keys = draw_keys(torch.arange(rows, dtype=torch.int64) * 7919 - 3,
                     torch.arange(rows, dtype=torch.int64)).to(DEVICE)
    picked = fused(scores, keys)
    assert picked.tolist() == gumbel_argmax(scores, keys).tolist()
    assert all(i % 3 for i in picked.tolist())


def test_fused_draw_checks_its_arguments() -> None:
    from shardgen.shard.sampling_kernel import gumbel_argmax as fused

    with pytest.raises(ValueError, match="float32"):
        fused(torch.zeros(2, 4, dtype=torch.float16, device=DEVICE),
              torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"keys must be \[2\] int64"):
        fused(torch.zeros(2, 4, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE))
