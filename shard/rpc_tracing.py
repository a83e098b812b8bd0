"""The shard's span per RPC: a SERVER span, child of the router's span that made the call.

`TracingInterceptor` sits outside the exception-to-status interceptor, so a failed call's
span carries the error, and the log line the other interceptor writes carries the trace
id. The server installs it only when tracing is on: with tracing off, an RPC costs
nothing more. The control RPCs (Health, Info, ServiceDiscovery) get no span: the
launcher's and the router's readiness polls would bury the steps. ClearCache gets one
only as part of a trace (the router clears the cache of an emptied batch outside any).

Each span is named after the RPC (`shardgen.v1.TextGenerationService/Prefill`) and says
what the router asked for: the batch id, its size (requests) and the tokens computed.
Its children, from the model runner, time the KV write plan, the forward pass and the
sampling of the step (shard/runner.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from shardgen.common.tracing import extract_metadata
from shardgen.proto import generate_pb2

_tracer = trace.get_tracer("shardgen.shard")

UNTRACED_METHODS = frozenset({"Health", "Info", "ServiceDiscovery"})
# Traced only when the caller sent a trace context.
PARENTED_ONLY_METHODS = frozenset({"ClearCache"})

# Attribute names (rpc.* from OpenTelemetry's RPC semantic conventions).
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RANK = "shardgen.rank"
BATCH_ID = "shardgen.batch.id"
BATCH_SIZE = "shardgen.batch.size"
PREFILL_REQUESTS = "shardgen.batch.prefill_requests"
TOKENS = "shardgen.batch.tokens"

Describe = Callable[[Any], Mapping[str, AttributeValue]]
UnaryHandler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _chunk_tokens(request: generate_pb2.Request) -> int:
    """Prompt tokens a Prefill computes for one request (its chunk past the cache)."""
    if request.chunk_len:
        return request.chunk_len
    return len(request.input_ids) - request.cache_len


def _prefill(request: generate_pb2.PrefillRequest) -> Mapping[str, AttributeValue]:
    decoding = len(request.cached_batch.request_ids) if request.HasField("cached_batch") else 0
    new = request.batch.requests
    return {BATCH_ID: request.batch.id, BATCH_SIZE: decoding + len(new),
            PREFILL_REQUESTS: len(new),
            TOKENS: decoding + sum(_chunk_tokens(r) for r in new)}


def _decode(request: generate_pb2.DecodeRequest) -> Mapping[str, AttributeValue]:
    rows = sum(len(batch.request_ids) for batch in request.batches)
    first = request.batches[0].id if request.batches else 0
    return {BATCH_ID: first, BATCH_SIZE: rows, TOKENS: rows}


def _filter(request: generate_pb2.FilterBatchRequest) -> Mapping[str, AttributeValue]:
    return {BATCH_ID: request.batch_id, BATCH_SIZE: len(request.request_ids)}


def _clear(request: generate_pb2.ClearCacheRequest) -> Mapping[str, AttributeValue]:
    return {BATCH_ID: request.id} if request.HasField("id") else {}


def _warmup(request: generate_pb2.WarmupRequest) -> Mapping[str, AttributeValue]:
    return {BATCH_SIZE: request.max_batch_size, TOKENS: request.max_batch_prefill_tokens}


_DESCRIBE: dict[str, Describe] = {"Prefill": _prefill, "Decode": _decode,
                                  "FilterBatch": _filter, "ClearCache": _clear,
                                  "Warmup": _warmup}


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Opens a SERVER span per RPC (see the module docstring)."""

    def __init__(self, rank: int) -> None:
        self._rank = rank

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_name = handler_call_details.method.lstrip("/")  # "package.Service/Method"
        service, _, method = full_name.rpartition("/")
        if handler is None or handler.unary_unary is None or method in UNTRACED_METHODS:
            return handler
        attributes = {RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: method,
                      RANK: self._rank}
        return grpc.unary_unary_rpc_method_handler(
            _traced(full_name, attributes, _DESCRIBE.get(method), handler.unary_unary,
                    parented_only=method in PARENTED_ONLY_METHODS),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _traced(name: str, attributes: Mapping[str, AttributeValue], describe: Describe | None,
            call: UnaryHandler, *, parented_only: bool) -> UnaryHandler:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        parent = extract_metadata(context.invocation_metadata())
        if parented_only and not trace.get_current_span(parent).get_span_context().is_valid:
            return await call(request, context)
        with _tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER,
                                           attributes=attributes, context=parent) as span:
            if describe is not None:
                span.set_attributes(describe(request))
            return await call(request, context)
    return traced
