"""Run-ahead (generate.proto, RunAhead) on the real runner and stories260K, on CPU.

The same scripted sequence of calls goes to a runner that runs ahead and to one that does
not; every token, log-probability and finish reason must agree. The scripts cover what a
step ahead meets in serving: plain decodes (adopted whole), a FilterBatch between two
decodes (adopted in part), a Prefill while a step is ahead (discarded), requests that stop
on length (left out of the step ahead) and on a stop token (in it, result dropped),
repetition and frequency penalties and seeded sampling (their device state must follow
the adopted steps exactly); and prompts sent ahead (`next_requests`): chunks of a long
prompt and whole prompts computed beside the running rows in the step ahead and adopted
by the Prefill that names them, one that the next call does not name (discarded), and
one that asks for prompt log-probabilities (nothing runs ahead).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from shardgen.proto import generate_pb2 as pb
from shardgen.shard.main import build_runner
from shardgen.shard.runner import ModelRunner

from shard_rpc import BLOCK_SIZE, greedy, shard_config


def make_runner(run_ahead: bool) -> ModelRunner:
    flag = "--run-ahead" if run_ahead else "--no-run-ahead"
    runner = build_runner(shard_config("/tmp/unused", "--num-blocks", "256", flag))
    runner.warmup(pb.WarmupRequest(max_batch_prefill_tokens=256, max_batch_size=8, max_total_tokens=256))
    return runner


class Driver:
    """The router's side: blocks kept one position ahead, one cached batch, run_ahead asked."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.free = list(range(255, 0, -1))
        self.blocks: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}     # tokens the request holds (prompt + generated)
        self.out: dict[int, list[tuple[int, float, int]]] = {}
        self.prompt_logprobs: dict[int, list[float]] = {}
        self.batch: pb.CachedBatch | None = None

    def _grow(self, rid: int, tokens: int) -> list[int]:
        table = self.blocks.setdefault(rid, [])
        new = []
        while len(table) * BLOCK_SIZE < tokens:
            new.append(self.free.pop())
            table.append(new[-1])
        return new

    def _extensions(self) -> list[pb.BlockTableExtension]:
        out = []
        for rid in self.batch.request_ids if self.batch is not None else []:
            new = self._grow(rid, self.length[rid] + 1)  # the token after next has a slot
            if new:
                out.append(pb.BlockTableExtension(request_id=rid, blocks=new))
        return out

    def request(self, rid: int, prompt: list[int], max_new: int, stop: tuple[int, ...] = (),
                start: int = 0, length: int = 0, prefill_logprobs: bool = False,
                **params: object) -> pb.Request:
        """Tokens [start, start + length) of the prompt (length 0: to its end)."""
        if rid not in self.out:
            self.length[rid] = len(prompt)
            self.out[rid] = []
            self._grow(rid, len(prompt) + 1)
        table = self.blocks[rid]
        return pb.Request(
            id=rid, input_ids=prompt, parameters=greedy(**params), blocks=table,
            slots=[table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, len(prompt))],
            cache_len=start, chunk_len=length, prefill_logprobs=prefill_logprobs,
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new,
                                                              stop_token_ids=list(stop)))

    def prefill(self, batch_id: int, *requests: pb.Request, next: tuple[pb.Request, ...] = ()) -> None:
        message = pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests), run_ahead=True,
                                    block_extensions=self._extensions(), next_requests=next)
        if self.batch is not None:
            message.cached_batch.CopyFrom(self.batch)
        self._absorb(self.runner.prefill(message))

    def decode(self, next: tuple[pb.Request, ...] = ()) -> None:
        assert self.batch is not None
        extensions = self._extensions()
        self._absorb(self.runner.decode(pb.DecodeRequest(batches=[self.batch], block_extensions=extensions,
                                                         run_ahead=True, next_requests=next)))

    def keep(self, *rids: int) -> None:
        assert self.batch is not None
        self.batch = self.runner.filter_batch(pb.FilterBatchRequest(batch_id=self.batch.id, request_ids=rids))

    def _absorb(self, response: pb.PrefillResponse | pb.DecodeResponse) -> None:
        for generation in response.generations:
            if generation.prefill_tokens.ids:
                self.prompt_logprobs[generation.request_id] = list(generation.prefill_tokens.logprobs)
            for token, logprob in zip(generation.tokens.ids, generation.tokens.logprobs):
                self.out[generation.request_id].append((token, logprob, generation.finish_reason))
                self.length[generation.request_id] += 1
        self.batch = response.batch if response.HasField("batch") else None


def script(runner: ModelRunner, stop_token: int | None) -> dict[int, list[tuple[int, float, int]]]:
    driver = Driver(runner)
    prompts = {rid: list(range(3 + rid, 3 + rid + 9 + 5 * rid)) for rid in range(1, 6)}
    driver.prefill(1,
                   driver.request(1, prompts[1], max_new=6),                     # stops on length early
                   driver.request(2, prompts[2], max_new=40, repetition_penalty=1.3,
                                  frequency_penalty=0.4),
                   driver.request(3, prompts[3], max_new=40, do_sample=True, seed=11, top_k=20,
                                  temperature=0.9))
    for _ in range(5):
        driver.decode()
    driver.prefill(2, driver.request(4, prompts[4], max_new=40,                 # a step ahead is discarded
                                     stop=(stop_token,) if stop_token is not None else ()))
    for _ in range(6):
        driver.decode()
    driver.keep(*[rid for rid in driver.batch.request_ids if rid != 2])         # adopted in part
    while driver.batch is not None:
        driver.decode()
    driver.prefill(3, driver.request(5, prompts[5], max_new=18, presence_penalty=0.5))
    while driver.batch is not None:
        driver.decode()
    return driver.out


def test_running_ahead_changes_no_token_and_is_adopted() -> None:
    plain = script(make_runner(run_ahead=False), stop_token=None)
    # Request 4 stops on a token it generates mid-way: the shard cannot know in advance.
    stop_token = plain[4][7][0]
    plain = script(make_runner(run_ahead=False), stop_token=stop_token)
    assert plain[4][-1][2] == pb.FINISH_REASON_EOS_TOKEN and len(plain[4]) <= 8
    ahead_runner = make_runner(run_ahead=True)
    ahead = script(ahead_runner, stop_token=stop_token)

    assert sorted(ahead) == sorted(plain)
    for rid in plain:
        assert [t for t, _, _ in ahead[rid]] == [t for t, _, _ in plain[rid]], rid
        assert [r for _, _, r in ahead[rid]] == [r for _, _, r in plain[rid]], rid
        np.testing.assert_allclose([lp for _, lp, _ in ahead[rid]], [lp for _, lp, _ in plain[rid]],
                                   rtol=0, atol=1e-5)
    counts = ahead_runner.run_ahead_counts
    assert counts["adopted"] >= 30
    assert counts["discarded"] >= 1      # the Prefill of request 4 (request 5 comes to an empty batch)
    assert counts["launched"] == counts["adopted"] + counts["discarded"] + (ahead_runner._ahead is not None)


def prefill_script(runner: ModelRunner, stop_token: int | None
                   ) -> tuple[Driver, list[tuple[str, int, int, int]]]:
    """Prompts sent ahead, as the router plans them with admit_ahead; returns the driver
    and, after each call, the run-ahead counts (adopted, adopted with prompts, discarded)."""
    driver = Driver(runner)
    prompts = {rid: list(range(2 + rid, 2 + rid + 7 + 3 * rid)) for rid in range(1, 9)}
    long = [(7 * p + 3) % 500 + 3 for p in range(45)]
    stop = (stop_token,) if stop_token is not None else ()
    counts = []

    def note(label: str) -> None:
        c = runner.run_ahead_counts
        counts.append((label, c["adopted"], c["adopted with prompts"], c["discarded"]))

    first = driver.request(1, prompts[1], max_new=5)                      # stops on length early
    second = driver.request(2, prompts[2], max_new=30, stop=stop)         # stops on a token
    long_a = driver.request(3, long, max_new=9, start=0, length=20)
    driver.prefill(1, first, second, next=(long_a,))
    note("prefill 1, the first chunk of 3 ahead")
    long_b = driver.request(3, long, max_new=9, start=20, length=16)
    sampled = driver.request(4, prompts[4], max_new=12, do_sample=True, seed=7, top_k=30,
                             repetition_penalty=1.2)
    driver.prefill(2, long_a, next=(long_b, sampled))
    note("prefill 2 adopted")
    long_c = driver.request(3, long, max_new=9, start=36)
    driver.prefill(3, long_b, sampled, next=(long_c,))
    note("prefill 3 adopted")
    driver.prefill(4, long_c)                                              # a decode ahead
    note("prefill 4 adopted")
    for _ in range(3):
        driver.decode()
    planned = driver.request(5, prompts[5], max_new=6)
    driver.decode(next=(planned,))                                         # 5 planned ahead ...
    note("decode, 5 ahead")
    other = driver.request(6, prompts[6], max_new=6)
    driver.prefill(5, other, next=(planned,))                              # ... 6 comes instead
    note("prefill 5: 6 instead of 5")
    asks = driver.request(7, prompts[7], max_new=4, prefill_logprobs=True)
    driver.prefill(6, planned, next=(asks,))                               # nothing runs ahead
    note("prefill 6, 7 ahead with prompt logprobs")
    driver.prefill(7, asks)
    note("prefill 7")
    while driver.batch is not None:
        driver.decode()
    return driver, counts


def test_prompts_sent_ahead_change_no_token_and_are_adopted() -> None:
    plain, _ = prefill_script(make_runner(run_ahead=False), stop_token=None)
    # Request 2 stops on its second token, in the step whose next step (with request 3's
    # second chunk and request 4) is already running: its row there is dropped.
    stop_token = plain.out[2][1][0]
    plain, _ = prefill_script(make_runner(run_ahead=False), stop_token=stop_token)
    assert plain.out[2][-1][2] == pb.FINISH_REASON_EOS_TOKEN and len(plain.out[2]) == 2
    ahead_runner = make_runner(run_ahead=True)
    ahead, counts = prefill_script(ahead_runner, stop_token=stop_token)

    assert sorted(ahead.out) == sorted(plain.out) == list(range(1, 8))
    for rid in plain.out:
        assert [t for t, _, _ in ahead.out[rid]] == [t for t, _, _ in plain.out[rid]], rid
        assert [r for _, _, r in ahead.out[rid]] == [r for _, _, r in plain.out[rid]], rid
        np.testing.assert_allclose([lp for _, lp, _ in ahead.out[rid]],
                                   [lp for _, lp, _ in plain.out[rid]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ahead.prompt_logprobs[7], plain.prompt_logprobs[7], rtol=0, atol=1e-5)
    assert counts == [
        ("prefill 1, the first chunk of 3 ahead", 0, 0, 0),
        ("prefill 2 adopted", 1, 1, 0),
        ("prefill 3 adopted", 2, 2, 0),
        ("prefill 4 adopted", 3, 3, 0),
        ("decode, 5 ahead", 7, 3, 0),
        ("prefill 5: 6 instead of 5", 7, 3, 1),
        ("prefill 6, 7 ahead with prompt logprobs", 8, 4, 1),
        ("prefill 7", 8, 4, 1),
    ]
    final = ahead_runner.run_ahead_counts
    assert final["launched"] == final["adopted"] + final["discarded"] + (ahead_runner._ahead is not None)


def test_a_runner_that_does_not_run_ahead_ignores_the_request() -> None:
    runner = make_runner(run_ahead=False)
    script(runner, stop_token=None)
    assert runner.run_ahead_counts == Counter()


@pytest.mark.parametrize("lacking", [True, False])
def test_nothing_runs_ahead_without_the_next_block(lacking: bool) -> None:
    """A row whose table ends at its last prompt token's block gets no step ahead (the
    token it samples goes to the next block); with that block there, the step runs ahead."""
    runner = make_runner(run_ahead=True)
    prompt = list(range(5, 5 + BLOCK_SIZE))   # fills block 3; the sampled token goes to position 16
    blocks = [3] if lacking else [3, 4]
    request = pb.Request(
        id=9, input_ids=prompt, parameters=greedy(), blocks=blocks,
        slots=[3 * BLOCK_SIZE + p for p in range(len(prompt))],
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=5))
    runner.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request]), run_ahead=True))
    assert runner.run_ahead_counts["launched"] == (0 if lacking else 1)
