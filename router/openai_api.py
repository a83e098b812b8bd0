"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

A request runs the same path as a TGI one (validate, tokenize, submit, `TextStream`), with
OpenAI's shapes around it (router/openai_params.py in, router/openai_schema.py out):

- chat: the tokenizer's chat template renders the messages (router/chat_template.py);
  the template's text already holds its special tokens, so it is encoded without adding
  any, and the tokenizer's EOS token (the end of a turn) stops generation too.
- `n` choices (and a list of prompts on /v1/completions) are separate engine requests of
  one HTTP request: choice i draws with seed + i; prompts × n may not exceed
  --max-concurrent-requests; usage counts each prompt once.
- Streams send `data: {chunk}` events (a role chunk first per chat choice, text held back
  while it may begin a stop sequence), the usage chunk when `stream_options.include_usage`,
  and end with `data: [DONE]`; an error after the first chunk arrives as an event
  `{"error": {...}, "error_type": ...}`.

Errors on these routes have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with TGI's `error_type` beside it (`openai_errors` rewrites what the error middleware made).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry import context as otel_context

from shardgen.router import http_spans
from shardgen.router import openai_schema as schema
from shardgen.router.chat_template import check_no_control_tokens, render_chat
from shardgen.router.openai_params import (OpenAIOptions, choice_seeds, max_new_tokens,
                                           parse_chat_body, parse_completion_body)
from shardgen.router.request_metrics import RequestTimer
from shardgen.router.request_registry import REQUEST_ID
from shardgen.router.requests import GenerationError, GenerationRequest, StoppingParams
from shardgen.router.server import (_OUTCOME, STATE, Completion, Handler, NotReadyError,
                                    ServerState, _read_json, run_to_end, submit)
from shardgen.router.sse import EventStream
from shardgen.router.token_stream import TextStream, TextToken
from shardgen.router.validation import GenerateParameters, ValidationError, build_request

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
MODEL_ROUTE = "/v1/models/{model_id:.+}"
_CREATED = web.AppKey("shardgen_openai_created", int)

JsonDict = schema.JsonDict
# The status a failure would have had before the stream started (for the error event).
_STREAM_ERROR_STATUS = {"cancelled": 499, "timeout": 504}


@dataclass(frozen=True)
class _Job:
    """One tokenized OpenAI request: an engine request per choice, and how to answer."""

    chat: bool
    completion_id: str
    created: int
    model: str
    fingerprint: str
    options: OpenAIOptions
    params: GenerateParameters
    requests: list[GenerationRequest]   # choice order: prompt by prompt, n each
    prompts: list[str]                  # per choice, its prompt's text (echo)
    prompt_tokens: int                  # every prompt once
    timer: RequestTimer

    @property
    def kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


# ---------------------------------------------------------------- routes


def add_openai_routes(app: web.Application) -> None:
    """Serve the OpenAI routes on an app made by `server.create_app`."""
    app[_CREATED] = int(time.time())
    app.middlewares.insert(0, openai_errors)
    app.router.add_post(CHAT_ROUTE, chat_completions)
    app.router.add_post(COMPLETIONS_ROUTE, completions)
    app.router.add_get(MODELS_ROUTE, list_models)
    app.router.add_get(MODEL_ROUTE, get_model)


def _is_openai_path(path: str) -> bool:
    return path in (CHAT_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE) or path.startswith(
        MODELS_ROUTE + "/")


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give error answers of the OpenAI routes OpenAI's shape (outermost middleware)."""
    response = await handler(request)
    if (response.status < 400 or not _is_openai_path(request.path)
            or not isinstance(response, web.Response) or response.text is None
            or response.content_type != "application/json"):
        return response
    body = json.loads(response.text)
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return response
    reshaped = web.json_response(schema.error_body(response.status, body["error"],
                                                   str(body.get("error_type", "http"))),
                                 status=response.status)
    if "Allow" in response.headers:  # a 405 names the methods the route has
        reshaped.headers["Allow"] = response.headers["Allow"]
    return reshaped


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    state = _admitting(request)
    timer = RequestTimer(state.metrics)
    with http_spans.child("validate"):
        chat = parse_chat_body(await _read_json(request), state.limits)
        if not state.config.parse_special_tokens:
            check_no_control_tokens(state.tokenizer, chat.messages)
        prompt = await render_chat(state.tokenizer, chat.messages)
        with http_spans.child("tokenize"):
            # The rendered template holds its own special tokens (BOS and turn markers):
            # none is added, and their strings are parsed as the special tokens.
            ids = await state.tokenizer.encode(prompt, add_special_tokens=False,
                                               parse_special_tokens=True)
    eos = state.tokenizer.hf.eos_token_id
    job = _job(request, state, chat=True, options=chat.options, params=chat.params,
               prompts=[(prompt, ids)], timer=timer,
               stop_token_ids=(eos,) if isinstance(eos, int) else ())
    return await _answer(request, state, job)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    state = _admitting(request)
    timer = RequestTimer(state.metrics)
    with http_spans.child("validate"):
        body = parse_completion_body(await _read_json(request), state.limits)
        with http_spans.child("tokenize"):
            parse = state.config.parse_special_tokens
            prompts = [(text, await state.tokenizer.encode(text, parse_special_tokens=parse))
                       for text in body.prompts]
    job = _job(request, state, chat=False, options=body.options, params=body.params,
               prompts=prompts, timer=timer, stop_token_ids=())
    return await _answer(request, state, job)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the one model this server serves."""
    state = request.app[STATE]
    return web.json_response(schema.models_list(state.info.model_id, request.app[_CREATED],
                                                _max_model_len(state)))


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id}: the model, if it is the one served (else 404)."""
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id != state.info.model_id:
        return web.json_response(schema.error_body(
            404, f"model {model_id!r} is not served here; this server serves "
                 f"{state.info.model_id!r}", "not_found"), status=404)
    return web.json_response(schema.model_card(model_id, request.app[_CREATED],
                                               _max_model_len(state)))


def _max_model_len(state: ServerState) -> int:
    assert state.config.max_total_tokens is not None, "create_app resolved the limits"
    return state.config.max_total_tokens


def _admitting(request: web.Request) -> ServerState:
    state = request.app[STATE]
    if not state.accepting:
        raise NotReadyError("the server is shutting down and admits no new requests")
    return state


# ---------------------------------------------------------------- engine requests


def _job(request: web.Request, state: ServerState, *, chat: bool, options: OpenAIOptions,
         params: GenerateParameters, prompts: Sequence[tuple[str, list[int]]],
         timer: RequestTimer, stop_token_ids: tuple[int, ...]) -> _Job:
    """The engine requests of every (prompt, choice), checked against the limits."""
    choices = len(prompts) * options.n
    limit = state.config.max_concurrent_requests
    if choices > limit:
        raise ValidationError(f"{len(prompts)} prompt(s) x n={options.n} make {choices} "
                              f"generations, more than --max-concurrent-requests ({limit})")
    prompt_field = "messages" if chat else "prompt"
    requests, texts = [], []
    seeds = choice_seeds(params, options.n)
    for text, ids in prompts:
        budget = max_new_tokens(len(ids), params, state.limits, prompt_field,
                                 options.max_tokens_field)
        base = build_request(ids, budget, params)
        base = dataclasses.replace(
            base, stopping=StoppingParams(budget, params.ignore_eos, stop_token_ids),
            trace_context=otel_context.get_current())
        for seed in seeds:
            requests.append(dataclasses.replace(
                base, sampling=dataclasses.replace(params.sampling, seed=seed)))
            texts.append(text)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    http_spans.note_admitted(prompt_tokens, requests[0].stopping.max_new_tokens)
    timer.admitted(prompt_tokens)
    request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
    return _Job(chat=chat, completion_id=f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
                created=int(time.time()), model=state.info.model_id,
                fingerprint=f"shardgen-{state.info.version}", options=options, params=params,
                requests=requests, prompts=texts, prompt_tokens=prompt_tokens, timer=timer)


async def _answer(request: web.Request, state: ServerState, job: _Job) -> web.StreamResponse:
    if job.options.stream:
        return await _stream(request, state, job)
    finished = await _run_all(state, job)
    first = finished[0].stream
    assert first.finish_reason is not None
    job.timer.finished(first.generated_tokens)
    http_spans.note_finished(first.generated_tokens, first.finish_reason.value)
    choices = [schema.Choice(
        index=index, finish_reason=done.stream.finish_reason,  # type: ignore[arg-type]
        text=schema.final_text(done.stream.generated_text, done.stream.finish_reason,
                               job.params.stop),
        tokens=tuple(done.tokens), prefill=done.stream.prefill)
        for index, done in enumerate(finished)]
    if job.chat:
        return web.json_response(schema.chat_completion(
            job.completion_id, job.created, job.model, choices, job.prompt_tokens,
            job.options.logprobs, job.fingerprint))
    echoes = job.prompts if job.options.echo else [""] * len(choices)
    return web.json_response(schema.text_completion(
        job.completion_id, job.created, job.model, choices, job.prompt_tokens,
        job.options.logprobs, echoes, job.fingerprint))


async def _run_all(state: ServerState, job: _Job) -> list[Completion]:
    """Run every choice to its end; when one fails, the others are cancelled."""
    # The first choice times the request; timing the others too would count it n times.
    timers = [job.timer] + [RequestTimer(None)] * (len(job.requests) - 1)
    tasks = [asyncio.ensure_future(run_to_end(state, engine_request, job.params, timer))
             for engine_request, timer in zip(job.requests, timers, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for finished ones
        # The others' engine requests are cancelled before the error is answered.
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- streams


@dataclass
class _ChoiceState:
    """What a stream remembers per choice."""

    deltas: schema.TextDeltas
    started: bool = False
    offset: int = 0  # characters of the choice's text before its next token


@dataclass
class _Chunks:
    """Turns each (choice, token) of a job into the chunk events it sends."""

    job: _Job
    choices: list[_ChoiceState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [_ChoiceState(schema.TextDeltas(self.job.params.stop))
                        for _ in self.job.requests]

    def for_token(self, index: int, stream: TextStream, token: TextToken) -> list[JsonDict]:
        """The events to send for this token of choice `index` (maybe none)."""
        choice = self.choices[index]
        text = choice.deltas.next(stream.generated_text, token.finish_reason)
        first, choice.started = not choice.started, True
        if self.job.chat:
            return self._chat_events(index, token, text, first)
        return self._completion_events(index, stream, token, text, first)

    def _common(self, index: int) -> dict[str, object]:
        job = self.job
        return {"completion_id": job.completion_id, "created": job.created, "model": job.model,
                "fingerprint": job.fingerprint, "index": index,
                "with_usage_field": job.options.include_usage}

    def _chat_events(self, index: int, token: TextToken, text: str,
                     first: bool) -> list[JsonDict]:
        common = self._common(index)
        # OpenAI opens each choice with the role, before any content.
        events = [schema.chat_chunk(**common, delta={"role": "assistant", "content": ""})
                  ] if first else []  # type: ignore[arg-type]
        logprobs = schema.chat_logprobs([token]) if self.job.options.logprobs else None
        if text or logprobs or token.finish_reason is not None:
            events.append(schema.chat_chunk(
                **common, delta={"content": text} if text else {},  # type: ignore[arg-type]
                logprobs=logprobs, reason=token.finish_reason))
        return events

    def _completion_events(self, index: int, stream: TextStream, token: TextToken, text: str,
                           first: bool) -> list[JsonDict]:
        job, choice = self.job, self.choices[index]
        echo = job.prompts[index] if first and job.options.echo else ""
        logprobs = None
        if job.options.logprobs:
            # The prompt's tokens come with the echoed prompt, in the choice's first chunk.
            prefill = stream.prefill if echo else ()
            logprobs = schema.completion_logprobs([token], prefill, choice.offset + len(echo))
        choice.offset += len(echo) + len(token.text)
        if not (echo or text or logprobs or token.finish_reason is not None):
            return []
        return [schema.completion_chunk(**self._common(index),  # type: ignore[arg-type]
                                        text=echo + text, logprobs=logprobs,
                                        reason=token.finish_reason)]


async def _stream(request: web.Request, state: ServerState, job: _Job) -> web.StreamResponse:
    streams = _open_streams(state, job)
    events = EventStream(request)
    chunks = _Chunks(job)
    try:
        async with contextlib.aclosing(_merged(streams)) as tokens:
            async for index, token in tokens:
                if index == 0:
                    job.timer.token()
                for event in chunks.for_token(index, streams[index], token):
                    await events.send(event)
        if job.options.include_usage:
            await events.send(schema.usage_chunk(
                job.completion_id, job.created, job.model, job.fingerprint, job.kind,
                job.prompt_tokens, sum(stream.generated_tokens for stream in streams)))
    except GenerationError as error:
        if not events.started:
            raise  # still time to answer with a status (424, 499)
        request[_OUTCOME] = error.error_type
        status = _STREAM_ERROR_STATUS.get(error.error_type, 424)
        await events.send(schema.error_body(status, str(error), error.error_type))
    finally:
        for stream in streams:
            stream.close()
    first = streams[0]
    if first.finish_reason is not None:
        job.timer.finished(first.generated_tokens)
        http_spans.note_finished(first.generated_tokens, first.finish_reason.value)
    await events.send_text("[DONE]")
    return await events.finish()


def _open_streams(state: ServerState, job: _Job) -> list[TextStream]:
    """Submit every choice; if one is refused (429), cancel those already submitted."""
    streams: list[TextStream] = []
    try:
        for engine_request in job.requests:
            streams.append(TextStream(submit(state, engine_request), state.tokenizer,
                                      job.params.stop))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _merged(streams: Sequence[TextStream]) -> AsyncIterator[tuple[int, TextToken]]:
    """The tokens of several streams as they arrive, as (stream index, token).

    The first error of any stream is raised here, and ends the others.
    """
    if len(streams) == 1:
        async for token in streams[0]:
            yield 0, token
        return
    queue: asyncio.Queue[tuple[int, TextToken | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        try:
            async for token in stream:
                queue.put_nowait((index, token, None))
        except Exception as error:  # handed to the reader, which raises it
            queue.put_nowait((index, None, error))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, token, error = await queue.get()
            if error is not None:
                raise error
            if token is None:
                running -= 1
            else:
                yield index, token
    finally:
        for task in tasks:
            task.cancel()
