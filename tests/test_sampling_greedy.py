"""The greedy path of the sampler: the split-row Triton pick against torch (interpreter on
CPU, or a GPU), and `sample` on all-greedy batches against the general log-softmax path."""

from __future__ import annotations

import pytest
import torch

from shardgen.shard.sampling import SamplingBatch, SamplingParams, apply_penalties, greedy_pick, sample

from kernel_env import DEVICE, gpu_only, needs_kernels  # noqa: E402

BLOCK = 64  # small blocks, so that small rows span several blocks and chunks


def _reference(scores: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The general path: argmax, then the gathered log-softmax."""
    next_ids = scores.argmax(dim=-1)
    return next_ids.tolist(), torch.log_softmax(scores, dim=-1).gather(1, next_ids[:, None]).squeeze(1)


def _assert_matches_reference(scores: torch.Tensor, block: int = BLOCK) -> None:
    from shardgen.shard.sampling_kernel import greedy_pick as fused

    next_ids, logprobs = fused(scores, block=block)
    expected_ids, expected_logprobs = _reference(scores)
    assert next_ids.tolist() == expected_ids
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-5, equal_nan=True)


def _random(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


@needs_kernels
@pytest.mark.parametrize("rows, vocab", [(1, 7), (1, 3000), (5, 1000), (5, 4096)])
def test_fused_pick_matches_torch_on_random_rows(rows: int, vocab: int) -> None:
    _assert_matches_reference(_random(rows, vocab, rows * vocab).to(DEVICE))


@needs_kernels
def test_fused_pick_takes_the_smallest_of_tied_maxima() -> None:
    scores = _random(5, 1000, 1) - 20
    tied = [[3, 4, 900], [130, 69, 200], [640, 641, 700], [999, 998], [0, 1, 500]]
    for row, tokens in enumerate(tied):
        scores[row, tokens] = 7.5
    next_ids, _ = _reference(scores)
    assert next_ids == [3, 69, 640, 998, 0]  # ties within a block, across blocks and chunks
    _assert_matches_reference(scores.to(DEVICE))


@needs_kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on log(0)
def test_fused_pick_skips_minus_infinity() -> None:
    scores = _random(5, 1000, 2)
    scores[0, :500] = float("-inf")           # whole chunks of -inf before the maximum
    scores[1, ::2] = float("-inf")
    scores[2] = float("-inf")
    scores[2, 777] = -3.0                     # one finite token: logprob 0
    scores[3, 1:] = float("-inf")
    scores[4] = float("-inf")                 # nothing finite: id 0, nan as log_softmax gives
    _assert_matches_reference(scores.to(DEVICE))
    _, logprobs = _reference(scores)
    assert logprobs[2] == 0 and logprobs[4].isnan()


@needs_kernels
@pytest.mark.parametrize("block", [16, 128, 1024])
def test_fused_pick_on_a_vocab_not_a_multiple_of_the_block(block: int) -> None:
    _assert_matches_reference(_random(5, 1000 + 37, block).to(DEVICE), block=block)


@needs_kernels
def test_fused_pick_checks_its_arguments() -> None:
    from shardgen.shard.sampling_kernel import greedy_pick as fused

    with pytest.raises(ValueError, match="float32"):
        fused(torch.zeros(2, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="block 48"):
        fused(torch.zeros(2, 4, device=DEVICE), block=48)


def test_chunks_cover_the_row_and_are_not_empty() -> None:
    pytest.importorskip("triton")
    from shardgen.shard.sampling_kernel import greedy_chunks

    for rows, vocab, sms, block in [(1, 128256, 132, 1024), (128, 128256, 132, 1024), (5, 1000, 4, 64),
                                    (1, 7, 132, 1024), (4096, 32000, 132, 1024)]:
        splits, chunk = greedy_chunks(rows, vocab, sms, block)
        assert chunk % block == 0 and (splits - 1) * chunk < vocab <= splits * chunk


def _all_greedy_batch(vocab: int) -> SamplingBatch:
    """Greedy rows with each penalty, and one whose filters are ignored (temperature 0)."""
    params = [SamplingParams(), SamplingParams(repetition_penalty=3.0), SamplingParams(frequency_penalty=2.0),
              SamplingParams(watermark=True), SamplingParams(do_sample=True, temperature=0.0, top_k=3)]
    sequences = [[1, 2], [int(t) for t in range(0, vocab, 3)], [5, 5, 6], [0], [9]]
    return SamplingBatch.for_sequences(params, sequences, [0, 0, 3, 0, 0], vocab, torch.device(DEVICE))


@pytest.mark.parametrize("rows", [1, 5])
def test_sample_on_an_all_greedy_batch_matches_the_general_path(rows: int) -> None:
    batch = _all_greedy_batch(300).select(range(rows))
    logits = _random(rows, 300, 3).to(DEVICE)
    logits[:, 10:13] = logits.max() + 1  # a tie, moved by the penalties on some rows
    draw_index = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    previous = torch.arange(rows, dtype=torch.int64, device=DEVICE)
    out = sample(logits, batch, draw_index, previous)
    expected_ids, expected_logprobs = _reference(apply_penalties(logits, batch, previous))
    assert out.next_ids.tolist() == expected_ids
    torch.testing.assert_close(out.logprobs, expected_logprobs, rtol=0, atol=1e-5)
    assert out.top_ids.shape == out.top_logprobs.shape == (rows, 0)
    with_alternatives = sample(logits, batch, draw_index, previous, top_n=2)  # the general path
    assert with_alternatives.next_ids.tolist() == expected_ids
    torch.testing.assert_close(with_alternatives.logprobs, out.logprobs, rtol=0, atol=1e-5)


def test_torch_pick_matches_the_general_path_on_ties_and_minus_infinity() -> None:
    scores = _random(3, 50, 4)
    scores[0, [7, 3, 40]] = 100.0
    scores[1, :-1] = float("-inf")
    next_ids, logprobs = greedy_pick(scores)
    expected_ids, expected_logprobs = _reference(scores)
    assert next_ids.tolist() == expected_ids == [3, 49, int(scores[2].argmax())]
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-5)


@gpu_only
@pytest.mark.parametrize("rows", [1, 8, 128])
def test_fused_pick_at_llama3_vocab(rows: int) -> None:
    scores = _random(rows, 128256, rows).cuda()
    scores[:, [100_000, 64_000, 128_255]] = scores.max() + 1  # ties across chunks
    scores[rows // 2, :70_000] = float("-inf")
    from shardgen.shard.sampling_kernel import greedy_pick as fused

    next_ids, logprobs = fused(scores)
    expected_ids, expected_logprobs = _reference(scores)
    assert next_ids.tolist() == expected_ids
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-5)
