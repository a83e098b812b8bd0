"""What a step returns: stop decisions and the Generation messages of rank 0.

Prompt log-probabilities (`prefill_logprobs`): a chunk computing positions
[start, end) returns the log-probability of the prompt tokens at positions
start+1 .. min(end, len - 1), each predicted by the previous position's logits, plus
position 0 with NaN (nothing predicts it) when start is 0. Over the chunks of a prompt
every position appears exactly once, as in TGI's whole-prompt answer. Positions at or
before a reused prefix (cache_len > 0) are not computed and not returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shardgen.proto import generate_pb2
from shardgen.shard.batch import DecodeBatch, NewSequence
from shardgen.shard.sampling import SampleOutput

RUNNING = generate_pb2.FINISH_REASON_UNSPECIFIED
LENGTH = generate_pb2.FINISH_REASON_LENGTH
EOS_TOKEN = generate_pb2.FINISH_REASON_EOS_TOKEN
# Prompt rows whose logits are computed at once for prompt log-probabilities.
_LOGPROB_ROWS = 512


@dataclass(frozen=True)
class StepOutput:
    """A committed step: the batch still running (None if none) and rank 0's answer."""

    batch: DecodeBatch | None
    generations: list[generate_pb2.Generation]
    forward_ns: int


def finished_rows(batch: DecodeBatch, next_ids: np.ndarray, eos_token_ids: Collection[int],
                  max_positions: int) -> np.ndarray:
    """FinishReason per row after `advance`: RUNNING, or why the shard stops it.

    EOS (or a stop token) wins over length when both happen on the same token. A row
    also stops on length when its next input would sit past the model's positions.
    """
    reasons = np.full(len(batch), RUNNING, dtype=np.int64)
    reasons[(batch.num_generated >= batch.max_generated) | (batch.seq_lens > max_positions)] = LENGTH
    for row, (token, stopping) in enumerate(zip(next_ids.tolist(), batch.stopping)):
        if token in stopping.stop_token_ids or (not stopping.ignore_eos and token in eos_token_ids):
            reasons[row] = EOS_TOKEN
    return reasons


def build_generations(batch: DecodeBatch, picked: SampleOutput, next_ids: np.ndarray,
                      finished: np.ndarray, prompt_tokens: dict[int, generate_pb2.Tokens]
                      ) -> list[generate_pb2.Generation]:
    """One Generation per row of `batch` (the rows as they were sampled)."""
    top_n = max(batch.top_n_tokens)
    # Two device-to-host copies for everything: log-probabilities, and alternative ids.
    logprobs = torch.cat([picked.logprobs[:, None], picked.top_logprobs], dim=1).cpu().tolist()
    top_ids = picked.top_ids.cpu().tolist() if top_n else None
    generations = []
    for row, request_id in enumerate(batch.request_ids):
        generation = generate_pb2.Generation(
            request_id=request_id,
            tokens=generate_pb2.Tokens(ids=[int(next_ids[row])], logprobs=[logprobs[row][0]]),
            finish_reason=int(finished[row]))
        n = batch.top_n_tokens[row]
        if n and top_ids is not None:
            generation.top_tokens.append(_finite(top_ids[row][:n], logprobs[row][1:n + 1]))
        if request_id in prompt_tokens:
            generation.prefill_tokens.CopyFrom(prompt_tokens[request_id])
        generations.append(generation)
    return generations


def _finite(ids: list[int], logprobs: list[float]) -> generate_pb2.Tokens:
    """Alternatives a filter removed have -inf log-probability: they are not offered."""
    kept = [(i, lp) for i, lp in zip(ids, logprobs) if math.isfinite(lp)]
    return generate_pb2.Tokens(ids=[i for i, _ in kept], logprobs=[lp for _, lp in kept])


def prompt_logprobs(new: Sequence[NewSequence], spans: Sequence[tuple[int, int] | None],
                    hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]
                    ) -> dict[int, generate_pb2.Tokens]:
    """The prompt tokens' log-probabilities of every new sequence that asked for them.

    Logits are computed `_LOGPROB_ROWS` hidden rows at a time, so that a long prompt never
    holds a [prompt length, vocabulary] tensor. Every rank must call this (the logits of
    a tensor-parallel model take a collective), in the same step.
    """
    rows: list[int] = []
    targets: list[int] = []
    asked: list[tuple[NewSequence, list[int]]] = []
    for seq, span in zip(new, spans):
        if span is None:
            continue
        ids = seq.input_ids[seq.start + 1:min(seq.end + 1, len(seq.input_ids))]
        rows.extend(range(span[0], span[0] + len(ids)))
        targets.extend(ids)
        asked.append((seq, ids))
    values = _token_logprobs(hidden, rows, targets, compute_logits) if rows else []
    result = {}
    offset = 0
    for seq, ids in asked:
        first = [(seq.input_ids[0], math.nan)] if seq.start == 0 else []
        pairs = first + list(zip(ids, values[offset:offset + len(ids)]))
        offset += len(ids)
        result[seq.request_id] = generate_pb2.Tokens(ids=[i for i, _ in pairs],
                                                     logprobs=[lp for _, lp in pairs])
    return result


def _token_logprobs(hidden: torch.Tensor, rows: list[int], targets: list[int],
                    compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """log_softmax(logits of hidden[row])[target] for each pair."""
    index = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
    target = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
    values = []
    for start in range(0, len(rows), _LOGPROB_ROWS):
        chunk = slice(start, start + _LOGPROB_ROWS)
        logits = compute_logits(hidden.index_select(0, index[chunk]))
        picked = logits.gather(1, target[chunk, None])[:, 0]
        values.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(values).cpu().tolist()
