"""The one place where a shard's exceptions become gRPC statuses.

Servicer methods raise; `ExceptionToStatusInterceptor` logs each failure once (a warning
for a request the shard refuses, the traceback for a fault of its own) and ends the RPC
with a status whose details are the exception's message, so the router sees exactly what
went wrong and the server keeps serving.

Status codes: the shard's own errors below carry theirs; ValueError (a request the
router should not have sent) is INVALID_ARGUMENT; running out of memory is
RESOURCE_EXHAUSTED; anything else is INTERNAL.

Out of memory in a step: the step changed no state (the runner commits only after it
computed), its tensors are freed with the exception, and the CUDA allocator's cached
blocks go back to the device, so the router can fail that batch and carry on with
smaller steps.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch

logger = logging.getLogger(__name__)


class ShardError(Exception):
    """An error with a definite gRPC status."""

    code = grpc.StatusCode.INTERNAL


class NotReadyError(ShardError):
    """The call needs a step of the lifecycle that has not happened (e.g. Warmup)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BatchNotFoundError(ShardError):
    """A cached batch id the shard does not hold."""

    code = grpc.StatusCode.NOT_FOUND


class CapacityError(ShardError):
    """The KV cache cannot hold what the router asked for."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception maps to."""
    if isinstance(error, ShardError):
        return error.code
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


UnaryHandler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# Statuses that report a request the shard cannot serve, rather than a fault of the shard.
_CALLER_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION})


class ExceptionToStatusInterceptor(grpc.aio.ServerInterceptor):
    """Turns any exception escaping a unary RPC into a status carrying its message."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        return grpc.unary_unary_rpc_method_handler(
            _guarded(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _release_memory_of(error: BaseException) -> None:
    """After an out-of-memory step: drop its frames (and the tensors they hold) with the
    traceback, then give the CUDA allocator's free cached blocks back to the device."""
    error.__traceback__ = None
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _guarded(method: str, call: UnaryHandler) -> UnaryHandler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await call(request, context)
        except grpc.aio.AbortError:
            raise  # the servicer set its own status
        except Exception as error:  # every failure of an RPC ends here, by design
            code = status_code_of(error)
            if code in _CALLER_ERRORS:  # the message says it all; no traceback needed
                logger.warning("%s refused (%s): %s", method, code.name, error)
            else:
                logger.exception("%s failed (%s): %s", method, code.name, error)
            if isinstance(error, torch.OutOfMemoryError):
                _release_memory_of(error)  # after the log line, which prints the traceback
            await context.abort(code, f"{type(error).__name__}: {error}")
    return guarded
