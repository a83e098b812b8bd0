"""GET /openapi.json: it names every route the app serves (and no other), with its bounds."""

from __future__ import annotations

import pytest

from api_http_helpers import app_for, call, fetch, serve
from router_http_doubles import ScriptedEngine, router_config
from shardgen.router.metrics import Metrics
from shardgen.router.tokenization import Tokenizer

# Methods aiohttp adds by itself (HEAD beside every GET).
_IMPLICIT = {"HEAD"}


def spec_of(tokenizer: Tokenizer, **config: object) -> dict:
    answer = call(tokenizer, ScriptedEngine(lambda request: []), "GET", "/openapi.json",
                  **config)
    assert answer.status == 200
    return answer.json()


def documented_routes(spec: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, operations in spec["paths"].items()
            for method in operations}


@pytest.mark.parametrize("metrics", [None, Metrics()], ids=["plain", "metrics"])
def test_every_served_route_is_documented_and_nothing_else(tokenizer: Tokenizer,
                                                           metrics: Metrics | None) -> None:
    app = app_for(tokenizer, ScriptedEngine(lambda request: []), metrics)
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.method not in _IMPLICIT and route.resource is not None}
    spec = serve(app, lambda client: fetch(client, "GET", "/openapi.json")).json()
    assert documented_routes(spec) == served
    assert ("GET", "/metrics") in served if metrics else ("GET", "/metrics") not in served


def test_every_reference_resolves(tokenizer: Tokenizer) -> None:
    spec = spec_of(tokenizer)
    schemas = spec["components"]["schemas"]
    refs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(schemas)


def test_bounds_are_the_servers_limits(tokenizer: Tokenizer) -> None:
    config = router_config(max_top_n_tokens=3, max_best_of=4, max_stop_sequences=2)
    spec = spec_of(tokenizer, max_top_n_tokens=3, max_best_of=4, max_stop_sequences=2)
    schemas = spec["components"]["schemas"]
    tgi = schemas["GenerateParameters"]["properties"]
    assert tgi["max_new_tokens"]["maximum"] == config.max_total_tokens - 1
    assert tgi["top_n_tokens"]["maximum"] == 3 and tgi["best_of"]["maximum"] == 4
    assert tgi["stop"]["maxItems"] == 2 and tgi["truncate"]["maximum"] == config.max_input_tokens
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["maximum"] == 3 and chat["n"]["maximum"] == 4
    assert schemas["CompletionRequest"]["properties"]["logprobs"]["maximum"] == 3
    assert spec["info"]["version"] == "test"


def test_with_an_api_key_the_document_requires_it_except_on_probes(tokenizer: Tokenizer
                                                                    ) -> None:
    open_spec = spec_of(tokenizer)
    assert "security" not in open_spec
    assert "401" not in open_spec["paths"]["/generate"]["post"]["responses"]
    answer = call(tokenizer, ScriptedEngine(lambda request: []), "GET", "/openapi.json",
                  headers={"Authorization": "Bearer k"}, api_key="k")
    spec = answer.json()
    assert spec["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert spec["paths"]["/health"]["get"]["security"] == []


@pytest.mark.parametrize("path, allowed", [("/generate", "POST"),
                                           ("/v1/chat/completions", "POST"),
                                           ("/v1/requests/x", "DELETE")])
def test_a_wrong_method_is_405_naming_the_allowed_ones(tokenizer: Tokenizer, path: str,
                                                       allowed: str) -> None:
    answer = call(tokenizer, ScriptedEngine(lambda request: []), "PUT", path)
    assert answer.status == 405 and answer.headers["Allow"] == allowed
    assert answer.json()["error_type"] == "http"
