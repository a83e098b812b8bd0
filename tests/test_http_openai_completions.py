"""POST /v1/completions over the scripted engine: prompts, n, echo, logprobs, streams."""

from __future__ import annotations


from api_http_helpers import Answer, call
from router_http_doubles import ScriptedEngine, token_events
from shardgen.router.requests import FinishReason, PrefillEvent
from shardgen.router.tokenization import Tokenizer

PROMPTS = ["Once upon a time", "The little dog"]
CONTINUATION = ", there was a little girl named Lily."


def ids_of(tokenizer: Tokenizer, text: str = CONTINUATION) -> list[int]:
    return tokenizer.hf(text, add_special_tokens=False)["input_ids"]


def complete(tokenizer: Tokenizer, engine: ScriptedEngine, **fields: object) -> Answer:
    return call(tokenizer, engine, "POST", "/v1/completions",
                {"model": "m", "prompt": PROMPTS[0], **fields})


def test_one_prompt_gets_its_continuation_and_usage(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids))
    answer = complete(tokenizer, engine, max_tokens=len(ids))
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion"
    assert body["id"] == f"cmpl-{answer.headers['x-request-id']}"
    assert engine.submitted[0].input_ids == tokenizer.hf(PROMPTS[0])["input_ids"]
    (choice,) = body["choices"]
    assert choice["text"] == tokenizer.hf.decode(ids) and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == len(engine.submitted[0].input_ids)
    assert body["usage"]["completion_tokens"] == len(ids)


def test_a_list_of_prompts_times_n_gives_choices_prompt_by_prompt(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)

    def script(request):  # each request's length tells which prompt and seed it was
        return token_events(ids[:len(request.input_ids) + request.sampling.seed % 3])

    engine = ScriptedEngine(script)
    body = complete(tokenizer, engine, prompt=PROMPTS, n=2, seed=3).json()
    prompt_ids = [tokenizer.hf(p)["input_ids"] for p in PROMPTS]
    assert [r.input_ids for r in engine.submitted] == [prompt_ids[0]] * 2 + [prompt_ids[1]] * 2
    assert [r.sampling.seed for r in engine.submitted] == [3, 4, 3, 4]
    expected = [tokenizer.hf.decode(ids[:len(p) + seed % 3])
                for p in prompt_ids for seed in (3, 4)]
    assert [c["text"] for c in body["choices"]] == expected
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # Each prompt is counted once, each choice's tokens all.
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompt_ids))
    assert body["usage"]["completion_tokens"] == sum(
        len(ids[:len(p) + seed % 3]) for p in prompt_ids for seed in (3, 4))


def test_echo_puts_the_prompt_in_front(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    body = complete(tokenizer, ScriptedEngine(lambda r: token_events(ids)), echo=True).json()
    assert body["choices"][0]["text"] == PROMPTS[0] + tokenizer.hf.decode(ids)


def test_echo_with_logprobs_lists_the_prompt_tokens_first(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)[:4]

    def script(request):
        assert request.prefill_logprobs and request.top_n_tokens == 1
        prompt = request.input_ids
        return [PrefillEvent(tuple(prompt), tuple(-1.0 - i for i in range(len(prompt) - 1))),
                *token_events(ids)]

    body = complete(tokenizer, ScriptedEngine(script), echo=True, logprobs=1).json()
    logprobs = body["choices"][0]["logprobs"]
    prompt_ids = tokenizer.hf(PROMPTS[0])["input_ids"]
    prompt_count = len(prompt_ids)
    assert logprobs["tokens"][:prompt_count] == [tokenizer.decode([i]) for i in prompt_ids]
    assert "".join(logprobs["tokens"][prompt_count:]) == tokenizer.hf.decode(ids)
    assert logprobs["token_logprobs"] == [None] + [-1.0 - i for i in range(len(prompt_ids) - 1)
                                                   ] + [e.logprob for e in token_events(ids)]
    assert logprobs["top_logprobs"][:prompt_count] == [None] * prompt_count
    # Generated tokens' offsets point into the returned text, after the echoed prompt.
    text = body["choices"][0]["text"]
    for offset, piece in zip(logprobs["text_offset"][prompt_count:],
                             logprobs["tokens"][prompt_count:]):
        assert text[offset:offset + len(piece)] == piece


def test_a_stream_echoes_then_continues_and_ends_with_done(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    engine = ScriptedEngine(lambda request: token_events(ids, FinishReason.EOS_TOKEN))
    answer = complete(tokenizer, engine, stream=True, echo=True, n=2,
                      stream_options={"include_usage": True})
    events = answer.events()
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 2 * len(ids)
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[:-2] if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == PROMPTS[0] + tokenizer.hf.decode(ids)
        assert mine[-1]["finish_reason"] == "stop"


def test_stop_sequences_are_left_out_of_the_text(tokenizer: Tokenizer) -> None:
    ids = ids_of(tokenizer)
    full = tokenizer.hf.decode(ids)
    for stream in (False, True):
        answer = complete(tokenizer, ScriptedEngine(lambda r: token_events(ids)),
                          stop=["little"], stream=stream)
        if stream:
            text = "".join(e["choices"][0]["text"] for e in answer.events()[:-1])
        else:
            text = answer.json()["choices"][0]["text"]
        assert text == full[:full.index("little")]


def test_more_generations_than_the_engine_admits_are_refused(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([5]))
    answer = call(tokenizer, engine, "POST", "/v1/completions",
                  {"prompt": ["a", "b", "c"], "n": 2}, max_concurrent_requests=4)
    assert answer.status == 422 and "--max-concurrent-requests" in answer.json()["error"][
        "message"]
    assert engine.submitted == []


def test_a_prompt_over_the_limit_names_the_field(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(lambda request: token_events([5]))
    answer = complete(tokenizer, engine, prompt="word " * 600)
    assert answer.status == 422
    assert "`prompt` must have at most" in answer.json()["error"]["message"]
    answer = complete(tokenizer, engine, max_tokens=512)
    assert answer.status == 422 and "`max_tokens`" in answer.json()["error"]["message"]
