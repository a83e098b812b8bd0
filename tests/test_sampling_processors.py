"""Logits processors: which tokens each filter keeps, and what penalties do to logits.

Small distributions are checked by hand; random ones against transformers' own
warpers and processors, which define the semantics the proto refers to.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shardgen.shard.sampling import (
    WATERMARK_DELTA,
    SamplingBatch,
    SamplingParams,
    apply_penalties,
    apply_warpers,
    sample,
)

CPU = torch.device("cpu")
PROBS = [0.4, 0.3, 0.2, 0.1]


def _log(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


def _kept(params: SamplingParams, logits: torch.Tensor) -> set[int]:
    batch = SamplingBatch([params] * len(logits), logits.shape[-1], CPU)
    warped = apply_warpers(logits, batch.flags, batch.temperature, batch.top_k, batch.top_p,
                           batch.typical_p, batch.min_p)
    return set(torch.isfinite(warped[0]).nonzero().flatten().tolist())


def _sampling(**kwargs: float) -> SamplingParams:
    return SamplingParams(do_sample=True, **kwargs)


@pytest.mark.parametrize("top_k, kept", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k: int, kept: set[int]) -> None:
    assert _kept(_sampling(top_k=top_k), _log(PROBS)) == kept


def test_top_k_keeps_ties_with_the_kth() -> None:
    assert _kept(_sampling(top_k=2), _log([0.4, 0.2, 0.2, 0.2])) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p, kept", [
    (0.35, {0}),            # 0.4 alone reaches 0.35
    (0.6, {0, 1}),          # 0.4 + 0.3 = 0.7 >= 0.6
    (0.8, {0, 1, 2}),       # 0.9 >= 0.8
    (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    assert _kept(_sampling(top_p=top_p), _log(PROBS)) == kept


def test_top_p_applies_after_top_k() -> None:
    # After top-k=2 the distribution is (4/7, 3/7): top_p=0.5 then keeps only token 0,
    # top_p=0.6 keeps both.
    assert _kept(_sampling(top_k=2, top_p=0.5), _log(PROBS)) == {0}
    assert _kept(_sampling(top_k=2, top_p=0.6), _log(PROBS)) == {0, 1}


@pytest.mark.parametrize("typical_p, kept", [
    # Entropy of PROBS is 1.2799 nats; |surprisal - entropy| is 0.364, 0.076, 0.329, 1.023,
    # so the tokens enter in the order 1 (mass 0.3), 2 (0.5), 0 (0.9), 3 (1.0).
    (0.2, {1}),
    (0.45, {1, 2}),
    (0.8, {0, 1, 2}),
    (0.95, {0, 1, 2, 3}),
])
def test_typical_p_keeps_tokens_closest_to_the_entropy(typical_p: float, kept: set[int]) -> None:
    assert _kept(_sampling(typical_p=typical_p), _log(PROBS)) == kept


@pytest.mark.parametrize("min_p, kept", [
    (0.2, {0, 1, 2, 3}),    # threshold 0.08
    (0.3, {0, 1, 2}),       # threshold 0.12
    (0.6, {0, 1}),          # threshold 0.24
    (0.9, {0}),             # threshold 0.36
])
def test_min_p_drops_tokens_below_a_share_of_the_top(min_p: float, kept: set[int]) -> None:
    assert _kept(_sampling(min_p=min_p), _log(PROBS)) == kept


def test_temperature_scales_before_filtering() -> None:
    # At temperature 2 the probabilities flatten to ∝ sqrt(p): 0.325, 0.282, 0.230, 0.163,
    # so top_p=0.65 needs three tokens instead of two (0.4 + 0.3).
    assert _kept(_sampling(top_p=0.65), _log(PROBS)) == {0, 1}
    assert _kept(_sampling(top_p=0.65, temperature=2.0), _log(PROBS)) == {0, 1, 2}


@pytest.mark.parametrize("params, reference", [
    (_sampling(top_k=7), TopKLogitsWarper(7)),
    (_sampling(top_p=0.8), TopPLogitsWarper(0.8)),
    (_sampling(typical_p=0.6), TypicalLogitsWarper(0.6)),
    (_sampling(min_p=0.05), MinPLogitsWarper(0.05)),
])
def test_filters_match_transformers(params: SamplingParams, reference: object) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    batch = SamplingBatch([params] * 6, 50, CPU)
    ours = apply_warpers(logits, batch.flags, batch.temperature, batch.top_k, batch.top_p,
                         batch.typical_p, batch.min_p)
    theirs = reference(torch.zeros(6, 1, dtype=torch.long), logits.clone())  # type: ignore[operator]
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


@pytest.mark.parametrize("top_ks", [[7, 7, 7, 7, 7, 7], [3, 9, 1, 50, 5, 0], [3, 9, 1, 50, 5, 80]])
def test_top_k_then_top_p_match_transformers_row_by_row(top_ks: list[int]) -> None:
    # All rows with a top_k sort only max(top_k) scores; a row without one sorts them all.
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4)) * 2
    top_ps = [0.5, 0.9, 0.3, 0.8, 1.0, 0.7]
    params = [_sampling(top_k=k, top_p=p) for k, p in zip(top_ks, top_ps)]
    batch = SamplingBatch(params, 50, CPU)
    ours = apply_warpers(logits, batch.flags, batch.temperature, batch.top_k, batch.top_p,
                         batch.typical_p, batch.min_p)
    for row, (k, p) in enumerate(zip(top_ks, top_ps)):
        theirs = logits[row:row + 1].clone()
        if k:
            theirs = TopKLogitsWarper(k)(torch.zeros(1, 1, dtype=torch.long), theirs)
        theirs = TopPLogitsWarper(p)(torch.zeros(1, 1, dtype=torch.long), theirs)
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(theirs[0])), row


def test_ties_past_the_sorted_window_do_not_change_top_p() -> None:
    # Row 0 keeps its top 2 plus every score tied with the 2nd (ten tokens of 1.0); its top-p
    # cut must not depend on how many scores the batch sorts (max top_k: 2 alone, 12 here).
    logits = torch.full((1, 40), -5.0)
    logits[0, 0] = 3.0
    logits[0, 1:11] = 1.0
    params = _sampling(top_k=2, top_p=0.5)
    alone = _kept(params, logits)
    batch = SamplingBatch([params, _sampling(top_k=12)], 40, CPU)
    together = apply_warpers(logits.repeat(2, 1), batch.flags, batch.temperature, batch.top_k,
                             batch.top_p, batch.typical_p, batch.min_p)
    assert alone == set(torch.isfinite(together[0]).nonzero().flatten().tolist())
    # Mass of token 0 among the kept: e^3 / (e^3 + 10e) = 0.42 < 0.5, so the ties stay.
    assert alone == set(range(11))


def test_rows_keep_their_own_filters() -> None:
    logits = _log(PROBS).repeat(3, 1)
    params = [_sampling(top_k=1), _sampling(), _sampling(top_p=0.6)]
    batch = SamplingBatch(params, 4, CPU)
    warped = apply_warpers(logits, batch.flags, batch.temperature, batch.top_k, batch.top_p,
                           batch.typical_p, batch.min_p)
    assert torch.isfinite(warped).sum(dim=1).tolist() == [1, 4, 2]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    batch = SamplingBatch.for_sequences([params], [[0, 1, 1]], [0], 4, CPU)
    scores = apply_penalties(logits, batch, torch.tensor([1]))
    assert scores.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_matches_transformers_over_prompt_and_generated() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=generator)
    sequences = [[3, 5, 5, 29], [0, 1, 2]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7)]
    batch = SamplingBatch.for_sequences(params, sequences, [1, 0], 30, CPU)
    ours = apply_penalties(logits, batch, torch.tensor([29, 2]))
    for row, (p, tokens) in enumerate(zip(params, sequences)):
        reference = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        theirs = reference(torch.tensor([tokens]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], theirs)


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    # Prompt [4, 4], then generated [1, 1, 3]: the prompt's 4 is not penalised.
    batch = SamplingBatch.for_sequences([params], [[4, 4, 1, 1, 3]], [3], 5, CPU)
    scores = apply_penalties(logits, batch, torch.tensor([3]))
    assert scores.tolist() == [[0.0, -2.0, 0.0, -1.5, 0.0]]
    batch.observe(torch.tensor([4]))
    scores = apply_penalties(logits, batch, torch.tensor([4]))
    assert scores.tolist() == [[0.0, -2.0, 0.0, -1.5, -1.5]]


def test_penalties_leave_rows_without_them_untouched() -> None:
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=0.5), SamplingParams()]
    batch = SamplingBatch.for_sequences(params, [[1, 2], [1, 2]], [1, 1], 6, CPU)
    scores = apply_penalties(logits, batch, torch.tensor([2, 2]))
    assert torch.equal(scores[1], logits[1])
    assert not torch.equal(scores[0], logits[0])


def test_watermark_biases_a_green_list_keyed_by_the_previous_token() -> None:
    logits = torch.zeros(3, 64)
    params = [SamplingParams(watermark=True), SamplingParams(watermark=True), SamplingParams()]
    batch = SamplingBatch(params, 64, CPU)
    scores = apply_penalties(logits, batch, torch.tensor([7, 7, 7]))
    green = scores[0] == WATERMARK_DELTA
    assert torch.equal(scores[0], scores[1])
    assert 16 <= int(green.sum()) <= 48  # about half the vocabulary
    assert torch.equal(scores[2], logits[2])
    other = apply_penalties(logits[:1], SamplingBatch(params[:1], 64, CPU), torch.tensor([8]))
    assert not torch.equal(other[0] == WATERMARK_DELTA, green)


def test_greedy_takes_the_argmax_of_penalised_logits() -> None:
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.0),
              SamplingParams(top_k=1), SamplingParams(repetition_penalty=100.0)]
    batch = SamplingBatch.for_sequences(params, [[0]] * 3 + [[int(logits[3].argmax())]], [0] * 4,
                                        40, CPU)
    out = sample(logits, batch, torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    expected = logits.argmax(dim=-1)
    assert out.next_ids[:3].tolist() == expected[:3].tolist()
    assert out.next_ids[3] != expected[3]
    assert out.next_ids[3] == logits[3].topk(2).indices[1]


def test_logprobs_are_of_the_processed_distribution() -> None:
    logits = _log(PROBS).repeat(2, 1)
    params = [SamplingParams(), _sampling(top_k=2, seed=5)]
    batch = SamplingBatch(params, 4, CPU)
    out = sample(logits, batch, torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                 top_n=3)
    assert out.next_ids[0] == 0
    assert out.logprobs[0].item() == pytest.approx(math.log(0.4), abs=1e-5)
    # The sampled row renormalises over the two tokens top-k kept.
    expected = {0: math.log(4 / 7), 1: math.log(3 / 7)}
    assert out.logprobs[1].item() == pytest.approx(expected[int(out.next_ids[1])], abs=1e-5)
    assert out.top_ids[0].tolist() == [0, 1, 2]
    assert out.top_logprobs[0].tolist() == pytest.approx([math.log(p) for p in PROBS[:3]], abs=1e-5)
    # Past what top-k kept, alternatives are -inf (the runner does not send those).
    assert out.top_ids[1, :2].tolist() == [0, 1]
    assert out.top_logprobs[1, 2].item() == float("-inf")


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=0.0),
    SamplingParams(do_sample=True, top_p=0.0),
    SamplingParams(do_sample=True, typical_p=1.5),
    SamplingParams(do_sample=True, temperature=-1.0),
    SamplingParams(do_sample=True, min_p=2.0),
    SamplingParams(do_sample=True, top_k=-1),
])
def test_out_of_range_parameters_are_rejected_with_their_value(params: SamplingParams) -> None:
    with pytest.raises(ValueError, match="must be"):
        params.validate()
