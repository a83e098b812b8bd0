"""Seeded draws: reproducible, independent of the batch, and distributed like the probs."""

from __future__ import annotations

import math

import torch

from shardgen.shard.sampling import SamplingBatch, SamplingParams, sample, splitmix64

CPU = torch.device("cpu")
MASK64 = (1 << 64) - 1


def _reference_splitmix64(x: int) -> int:
    """splitmix64's output function on Python ints (Vigna's reference code)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_tensor_hash_matches_the_reference_bit_for_bit() -> None:
    values = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, MASK64]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    ours = splitmix64(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [v & MASK64 for v in ours] == [_reference_splitmix64(v) for v in values]


def _draw(logits: torch.Tensor, params: list[SamplingParams], draw_index: list[int]) -> list[int]:
    batch = SamplingBatch(params, logits.shape[-1], CPU)
    n = torch.tensor(draw_index, dtype=torch.int64)
    return sample(logits, batch, n, torch.zeros_like(n)).next_ids.tolist()


def test_seeded_draws_repeat_and_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=generator)
    params = [SamplingParams(do_sample=True, seed=seed, top_p=0.95, temperature=1.3)
              for seed in (1, 2, 3, 1 << 63, 2**64 - 1)]
    draw_index = [0, 4, 7, 2, 9]
    together = _draw(logits, params, draw_index)
    assert together == _draw(logits, params, draw_index)
    alone = [_draw(logits[i:i + 1], [params[i]], [draw_index[i]])[0] for i in range(5)]
    assert together == alone
    order = [3, 0, 4, 2, 1]
    reversed_batch = _draw(logits[order], [params[i] for i in order], [draw_index[i] for i in order])
    assert reversed_batch == [together[i] for i in order]


def test_greedy_neighbours_do_not_change_a_seeded_draw() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(do_sample=True, seed=42)
    mixed = _draw(logits, [SamplingParams(), seeded, SamplingParams()], [0, 3, 0])
    assert mixed[1] == _draw(logits[1:2], [seeded], [3])[0]
    assert mixed[0] == int(logits[0].argmax()) and mixed[2] == int(logits[2].argmax())


def test_draws_move_with_the_token_index_and_the_seed() -> None:
    logits = torch.zeros(64, 1000)  # uniform: any change of the noise changes the pick
    same_seed = _draw(logits, [SamplingParams(do_sample=True, seed=9)] * 64, list(range(64)))
    assert len(set(same_seed)) > 50
    same_index = _draw(logits, [SamplingParams(do_sample=True, seed=s) for s in range(64)], [0] * 64)
    assert len(set(same_index)) > 50


def test_seeded_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    draws = 20000
    logits = probs.log().expand(draws, -1).contiguous()
    params = [SamplingParams(do_sample=True, seed=s) for s in range(draws)]
    picks = torch.tensor(_draw(logits, params, [s % 7 for s in range(draws)]))
    frequency = torch.bincount(picks, minlength=5).double() / draws
    # Five standard errors of a binomial proportion: fails by chance with p < 1e-5.
    tolerance = 5 * torch.sqrt(probs.double() * (1 - probs.double()) / draws)
    assert torch.all((frequency - probs.double()).abs() < tolerance), frequency.tolist()


def test_draws_respect_the_filters() -> None:
    logits = torch.tensor([[math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]]).expand(2000, -1)
    params = [SamplingParams(do_sample=True, seed=s, top_k=2) for s in range(2000)]
    picks = set(_draw(logits.contiguous(), params, [0] * 2000))
    assert picks == {0, 1}
