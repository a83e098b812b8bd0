"""Helpers for tests of the whole HTTP API (`api.build_app`) over the scripted engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from router_http_doubles import MODEL_INFO, SHARED, ScriptedEngine, router_config
from shardgen.router.api import build_app
from shardgen.router.metrics import Metrics
from shardgen.router.tokenization import Tokenizer

QWEN2 = SHARED / "tokenizers" / "qwen2"
LLAMA3 = SHARED / "tokenizers" / "llama3"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDict[str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def events(self) -> list[Any]:
        """The `data:` events of an SSE body: JSON objects, or the string "[DONE]"."""
        return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[5:])
                for line in self.text.splitlines() if line.startswith("data:")]


def app_for(tokenizer: Tokenizer, engine: ScriptedEngine, metrics: Metrics | None = None,
            **config: object) -> web.Application:
    return build_app(router_config(**config), tokenizer, engine, MODEL_INFO, metrics=metrics)


def serve(app: web.Application, body: Callable[[TestClient], Awaitable[Any]]) -> Any:
    """Run body(client) against app."""
    async def run() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await body(client)

    return asyncio.run(run())


async def fetch(client: TestClient, method: str, path: str, **kwargs: Any) -> Answer:
    response = await client.request(method, path, **kwargs)
    return Answer(response.status, CIMultiDict(response.headers), await response.text())


def call(tokenizer: Tokenizer, engine: ScriptedEngine, method: str, path: str,
         json_body: object = None, headers: dict[str, str] | None = None,
         **config: object) -> Answer:
    """One request against a fresh app."""
    app = app_for(tokenizer, engine, **config)
    return serve(app, lambda client: fetch(client, method, path, json=json_body,
                                           headers=headers or {}))
