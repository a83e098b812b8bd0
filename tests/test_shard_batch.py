"""Decode state and step layout: what the model is fed, and when requests stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardgen.proto import generate_pb2
from shardgen.shard.batch import CacheLimits, DecodeBatch, NewSequence, StoppingParams, build_step
from shardgen.shard.outputs import EOS_TOKEN, LENGTH, RUNNING, finished_rows
from shardgen.shard.sampling import SamplingParams

CPU = torch.device("cpu")
BS = 4
LIMITS = CacheLimits(block_size=BS, num_blocks=32, vocab_size=100, max_positions=64)


def _seq(request_id: int, ids: list[int], blocks: list[int], start: int = 0, end: int | None = None,
         *, logprobs: bool = False, max_new_tokens: int = 5, offset: int = 0,
         stop: frozenset[int] = frozenset(), ignore_eos: bool = False) -> NewSequence:
    end = len(ids) if end is None else end
    slots = [blocks[p // BS] * BS + p % BS for p in range(start, end)]
    return NewSequence(request_id, ids, blocks, slots, start, end, SamplingParams(),
                       StoppingParams(max_new_tokens, ignore_eos, stop), logprobs, 0, offset)


def _running() -> DecodeBatch:
    """Two requests after their prefill: 6 and 3 prompt tokens, one token generated each."""
    batch = DecodeBatch.from_new(1, [_seq(10, [5, 6, 7, 8, 9, 10], [3, 4]), _seq(11, [7, 8, 9], [6])],
                                 LIMITS.vocab_size, CPU)
    batch.advance(np.array([20, 21]), torch.tensor([20, 21]))
    return batch


def test_a_mixed_step_lays_out_decodes_then_prompt_chunks() -> None:
    running = _running().with_extensions({11: [9]}, LIMITS)
    chunk = _seq(12, list(range(1, 11)), [7, 8, 5], start=4, end=8)      # does not end the prompt
    whole = _seq(13, [1, 2, 3], [2], logprobs=True, offset=2)               # ends it, wants logprobs
    sampled = DecodeBatch.concat(2, [running, DecodeBatch.from_new(2, [whole], 100, CPU)])
    step = build_step(running, [chunk, whole], BS, CPU, sampled=sampled)
    assert step.input_ids.tolist() == [20, 21, 5, 6, 7, 8, 1, 2, 3]
    assert step.positions.tolist() == [6, 3, 4, 5, 6, 7, 0, 1, 2]
    # Decode slots come from the block tables (position 6 of [3, 4] is 4*4+2, 3 of [6] is
    # 6*4+3); the chunk's are the ones it was given (positions 4..7 in block 8).
    assert step.attn.slot_mapping.tolist() == [18, 27, 32, 33, 34, 35, 8, 9, 10]
    assert step.attn.seq_lens.tolist() == [7, 4, 8, 3]
    assert step.attn.cu_seqlens_q.tolist() == [0, 1, 2, 6, 9]
    assert (step.attn.max_seqlen_q, step.attn.max_seqlen_k) == (4, 8)
    assert step.attn.block_tables.tolist() == [[3, 4, 0], [6, 9, 0], [7, 8, 5], [2, 0, 0]]
    assert step.attn.block_tables.dtype == torch.int32 and step.attn.seq_lens.dtype == torch.int32
    # Both decodes and the last prompt's last token sample; the unfinished chunk does not.
    assert step.sample_rows.tolist() == [0, 1, 8]
    assert step.prefill_spans == [None, (6, 3)]
    assert step.draw_index.tolist() == [1, 1, 2]
    assert step.previous_tokens.tolist() == [20, 21, 3]


def test_extensions_make_new_batches_and_leave_the_old_one() -> None:
    batch = _running()
    extended = batch.with_extensions({10: [12, 13]}, LIMITS)
    assert extended.block_tables.tolist() == [[3, 4, 12, 13], [6, 0, 0, 0]]
    assert extended.num_blocks.tolist() == [4, 1]
    assert batch.block_tables.tolist() == [[3, 4], [6, 0]] and batch.num_blocks.tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"block ids must be in \[1, 32\)"):
        batch.with_extensions({10: [0]}, LIMITS)


def test_a_decode_past_the_block_table_asks_for_an_extension() -> None:
    batch = _running()
    batch.advance(np.array([22, 23]), torch.tensor([22, 23]))   # request 11: 5 tokens, 1 block of 4
    with pytest.raises(ValueError, match="request 11 needs block 1 for position 4 but has 1 blocks"):
        batch.decode_slots(BS)


def test_select_and_concat_keep_rows_together() -> None:
    batch = _running()
    other = DecodeBatch.from_new(5, [_seq(30, [1, 2], [9], max_new_tokens=9)], 100, CPU)
    merged = DecodeBatch.concat(7, [batch, other])
    assert merged.batch_id == 7 and merged.request_ids == [10, 11, 30]
    assert merged.seq_lens.tolist() == [7, 4, 2] and merged.block_tables.shape == (3, 2)
    picked = merged.select([2, 0])
    assert picked.request_ids == [30, 10]
    assert picked.last_tokens.tolist() == [2, 20] and picked.max_generated.tolist() == [9, 5]
    assert len(picked.sampling) == 2
    assert batch.batch_id == 1  # concat of one batch renames a copy, not the original
    assert DecodeBatch.concat(4, [batch]).batch_id == 4 and batch.batch_id == 1


def test_finish_reasons() -> None:
    batch = DecodeBatch.from_new(1, [
        _seq(1, [3], [1], max_new_tokens=1),                       # length
        _seq(2, [3], [2], max_new_tokens=5),                       # EOS
        _seq(3, [3], [3], max_new_tokens=5, ignore_eos=True),      # EOS ignored
        _seq(4, [3], [4], max_new_tokens=5, stop=frozenset({7})),  # stop token
        _seq(5, [3], [5], max_new_tokens=1, stop=frozenset({7})),  # stop token and length
        _seq(6, [3], [6], max_new_tokens=5),
    ], 100, CPU)
    next_ids = np.array([9, 2, 2, 7, 7, 9])
    batch.advance(next_ids, torch.from_numpy(next_ids))
    reasons = finished_rows(batch, next_ids, {2}, max_positions=64).tolist()
    assert reasons == [LENGTH, EOS_TOKEN, RUNNING, EOS_TOKEN, EOS_TOKEN, RUNNING]
    # A sequence whose next position would pass the model's last one stops on length.
    assert finished_rows(batch, next_ids, {2}, max_positions=1).tolist()[5] == LENGTH


def _request(**fields: object) -> generate_pb2.Request:
    base: dict[str, object] = dict(
        id=4, input_ids=[1, 2, 3, 4, 5], blocks=[1, 2], slots=[4, 5, 6, 7, 8],
        parameters=generate_pb2.NextTokenChooserParameters(repetition_penalty=1.0),
        stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=3))
    base.update(fields)
    return generate_pb2.Request(**base)


def test_requests_parse_into_chunks() -> None:
    seq = NewSequence.from_proto(_request(cache_len=1, chunk_len=2, slots=[5, 6, 7, 8]), LIMITS)
    assert (seq.start, seq.end, seq.slots, seq.finishes_prompt) == (1, 3, [5, 6], False)
    whole = NewSequence.from_proto(_request(), LIMITS)
    assert (whole.start, whole.end, whole.finishes_prompt) == (0, 5, True)


@pytest.mark.parametrize("fields, message", [
    (dict(input_ids=[]), "input_ids is empty"),
    (dict(chunk_len=9), "cache_len 0 + chunk_len 9 exceeds the 5 input tokens"),
    (dict(blocks=[1]), "1 blocks of 4 cannot hold 5 tokens"),
    (dict(slots=[0, 1, 2, 3, 4]), "(block 0 is reserved)"),
    (dict(stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=0)),
     "max_new_tokens must be at least 1, got 0"),
    (dict(generated_offset=5), "generated_offset 5 must be less than the 5 input tokens"),
    (dict(input_ids=list(range(1, 70)), blocks=list(range(1, 19)), slots=list(range(4, 73))),
     "69 input tokens exceed the model's 64 positions"),
])
def test_bad_requests_name_the_request_and_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        NewSequence.from_proto(_request(**fields), LIMITS)
    assert str(raised.value).startswith("request 4: ") and message in str(raised.value)
