"""The torch paged-attention path against a naive dense reference written from the contract."""

from __future__ import annotations

import math
import random

import pytest
import torch

from shardgen.shard.layers.attention import make_attention_metadata, paged_attention, write_kv


def _naive_attention(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, tables: list[list[int]],
    cache_lens: list[int], q_lens: list[int], block_size: int, scale: float, window: int,
) -> torch.Tensor:
    """Query by query, head by head, keys fetched slot by slot: slow and obviously right."""
    out = torch.zeros_like(q, dtype=torch.float64)
    groups = q.shape[1] // k_flat.shape[1]
    row = 0
    for blocks, cached, new in zip(tables, cache_lens, q_lens):
        for i in range(new):
            pos = cached + i
            visible = [p for p in range(pos + 1) if window == 0 or p > pos - window]
            slots = [blocks[p // block_size] * block_size + p % block_size for p in visible]
            for h in range(q.shape[1]):
                keys = k_flat[slots, h // groups].double()
                scores = keys @ q[row, h].double() * scale
                out[row, h] = torch.softmax(scores, 0) @ v_flat[slots, h // groups].double()
            row += 1
    return out


def _case(
    hq: int, hkv: int, d: int, block_size: int, seqs: list[tuple[int, int]], dtype: torch.dtype, seed: int,
) -> dict:
    """Random caches (NaN wherever nothing was written), scattered block tables and queries."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    needed = [-(-(cached + new) // block_size) for cached, new in seqs]
    num_blocks = sum(needed) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in needed]
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    cache_lens = [cached for cached, _ in seqs]
    q_lens = [new for _, new in seqs]
    # Every position of every sequence gets its K/V written (the cached ones "earlier").
    everything = make_attention_metadata(tables, [0] * len(seqs), [c + n for c, n in seqs], block_size)
    total = int(everything.slot_mapping.numel())
    write_kv(torch.randn(total, hkv, d, generator=generator).to(dtype),
             torch.randn(total, hkv, d, generator=generator).to(dtype), k_cache, v_cache, everything.slot_mapping)
    q = torch.randn(sum(q_lens), hq, d, generator=generator).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, cache_lens=cache_lens, q_lens=q_lens)


CASES = [
    # (Hq, Hkv, D, block_size, [(cached, new) per sequence], sliding window)
    (4, 4, 16, 4, [(0, 7), (5, 3)], 0),  # plain multi-head, a prefill and a chunk after a prefix
    (8, 2, 32, 16, [(0, 1), (20, 1), (32, 1)], 0),  # decodes only, GQA, one exactly fills a block
    (6, 3, 8, 2, [(0, 9), (10, 1), (3, 4), (0, 1)], 0),  # mixed varlen batch, GQA
    (4, 1, 16, 8, [(16, 5), (7, 1), (2, 1)], 4),  # MQA with a sliding window, chunk and decodes
    (4, 2, 16, 1, [(6, 2), (0, 3)], 3),  # block size 1
]


@pytest.mark.parametrize("hq, hkv, d, block_size, seqs, window", CASES)
def test_paged_attention_matches_naive_reference(hq, hkv, d, block_size, seqs, window) -> None:
    case = _case(hq, hkv, d, block_size, seqs, torch.float32, seed=len(seqs) + hq)
    meta = make_attention_metadata(case["tables"], case["cache_lens"], case["q_lens"], block_size)
    scale = 1 / math.sqrt(d)
    out = paged_attention(case["q"], case["k_cache"], case["v_cache"], meta.block_tables, meta.seq_lens,
                          meta.cu_seqlens_q, meta.max_seqlen_q, scale, sliding_window=window)
    expected = _naive_attention(case["q"], case["k_cache"].flatten(0, 1), case["v_cache"].flatten(0, 1),
                                case["tables"], case["cache_lens"], case["q_lens"], block_size, scale, window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_bfloat16_close_to_reference() -> None:
    case = _case(8, 2, 64, 4, [(0, 6), (9, 1), (4, 1)], torch.bfloat16, seed=11)
    meta = make_attention_metadata(case["tables"], case["cache_lens"], case["q_lens"], 4)
    out = paged_attention(case["q"], case["k_cache"], case["v_cache"], meta.block_tables, meta.seq_lens,
                          meta.cu_seqlens_q, meta.max_seqlen_q, 0.125)
    expected = _naive_attention(case["q"], case["k_cache"].flatten(0, 1), case["v_cache"].flatten(0, 1),
                                case["tables"], case["cache_lens"], case["q_lens"], 4, 0.125, 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_padding_decode_rows_come_out_as_zeros() -> None:
    """CUDA-graph padding: a decode row with seq_len 0 sees nothing; the others are unaffected."""
    case = _case(4, 2, 16, 4, [(5, 1), (0, 1), (2, 1)], torch.float32, seed=4)
    meta = make_attention_metadata(case["tables"], case["cache_lens"], case["q_lens"], 4)
    padded_lens = meta.seq_lens.clone()
    padded_lens[1] = 0
    args = (case["k_cache"], case["v_cache"], meta.block_tables)
    out = paged_attention(case["q"], *args, padded_lens, meta.cu_seqlens_q, 1, 0.25)
    full = paged_attention(case["q"], *args, meta.seq_lens, meta.cu_seqlens_q, 1, 0.25)
    assert not out[1].any()
    assert torch.equal(out[[0, 2]], full[[0, 2]])
    only_padding = paged_attention(case["q"][1:2], case["k_cache"], case["v_cache"], meta.block_tables[1:2],
                                   padded_lens[1:2], meta.cu_seqlens_q[:2], 1, 0.25)
    assert not only_padding.any()


def test_write_kv_touches_only_the_given_slots() -> None:
    k_cache = torch.zeros(5, 4, 2, 3)
    v_cache = torch.zeros(5, 4, 2, 3)
    slots = torch.tensor([13, 2, 7])
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    write_kv(key, value, k_cache, v_cache, slots)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 4, slot % 4], key[i])
        assert torch.equal(v_cache[slot // 4, slot % 4], value[i])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.flatten(0, 1)[untouched].any() and not v_cache.flatten(0, 1)[untouched].any()


def test_metadata_follows_the_contract_slot_rule() -> None:
    meta = make_attention_metadata([[7, 3, 9], [5]], cache_lens=[6, 0], query_lens=[3, 2], block_size=4)
    # positions 6, 7 in block 3 (index 1), position 8 in block 9; then positions 0, 1 in block 5
    assert meta.slot_mapping.tolist() == [3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 5 * 4 + 0, 5 * 4 + 1]
    assert meta.block_tables.tolist() == [[7, 3, 9], [5, 0, 0]]
    assert meta.block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    assert meta.seq_lens.tolist() == [9, 2]
    assert meta.cu_seqlens_q.tolist() == [0, 3, 5]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (3, 9)


def test_metadata_refuses_too_few_blocks() -> None:
    with pytest.raises(ValueError, match="9 tokens need 3 blocks, the sequence has 2"):
        make_attention_metadata([[1, 2]], cache_lens=[8], query_lens=[1], block_size=4)
