"""POST /tokenize: the tokens the server would feed the model for a prompt (TGI's route).

The body is a /generate body; its parameters are validated the same way, and `truncate`
applies (the last tokens are kept), so the answer shows exactly the prompt that /generate
would run (special-token strings parsed or not as --parse-special-tokens says). Each token
comes with its character span in `inputs` (`start`, `stop`) and that span's text; tokens
the tokenizer adds (BOS) have an empty span.
"""

from __future__ import annotations

from aiohttp import web

from shardgen.router.server import STATE, _read_json
from shardgen.router.validation import parse_generate_body

TOKENIZE_ROUTE = "/tokenize"


def add_tokenize_route(app: web.Application) -> None:
    """Serve POST /tokenize on an app made by `server.create_app`."""
    app.router.add_post(TOKENIZE_ROUTE, tokenize)


async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize: `[{"id", "text", "start", "stop"}, ...]`."""
    state = request.app[STATE]
    inputs, params = parse_generate_body(await _read_json(request), state.limits)
    tokens = await state.tokenizer.offsets(
        inputs, parse_special_tokens=state.config.parse_special_tokens)
    if params.truncate is not None:
        tokens = tokens[-params.truncate:]
    return web.json_response([{"id": token_id, "text": inputs[start:stop], "start": start,
                               "stop": stop} for token_id, start, stop in tokens])
