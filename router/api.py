"""The whole HTTP API of the router: every route module composed on one aiohttp app.

`build_app` is what the process entry serves: the TGI routes and probes of
`server.create_app`, the OpenAI routes, /tokenize, request ids with DELETE
/v1/requests/{id}, /v1/kv_events and /openapi.json. Tests that need only the TGI routes
may keep calling `create_app`.
"""

from __future__ import annotations

from aiohttp import web

from shardgen.router import request_registry
from shardgen.router.config import RouterConfig
from shardgen.router.kv_events import KVEventHub
from shardgen.router.kv_events_api import add_kv_events_route
from shardgen.router.metrics import Metrics
from shardgen.router.openai_api import add_openai_routes
from shardgen.router.openapi_spec import add_openapi_route
from shardgen.router.request_registry import RequestRegistry, TrackingEngine
from shardgen.router.server import Engine, ModelInfo, create_app
from shardgen.router.tokenization import Tokenizer
from shardgen.router.tokenize_api import add_tokenize_route


def build_app(config: RouterConfig, tokenizer: Tokenizer, engine: Engine, info: ModelInfo, *,
              metrics: Metrics | None = None, kv_events: KVEventHub | None = None
              ) -> web.Application:
    """The router's application over engine (see the module docstring).

    config must have its limits resolved. kv_events: the hub the block manager publishes
    to (a fresh, silent one when None).
    """
    registry = RequestRegistry()
    app = create_app(config, tokenizer, TrackingEngine(engine, registry), info, metrics=metrics)
    request_registry.install(app, registry)
    add_openai_routes(app)
    add_tokenize_route(app)
    add_kv_events_route(app, kv_events if kv_events is not None else KVEventHub())
    add_openapi_route(app)
    return app
