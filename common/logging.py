"""Log set-up shared by the launcher, the router and the shards.

Each process calls `setup_logging` once at its entry point. Plain output is one line per
record; `--json-output` gives one JSON object per line with the process, its rank and the
current OpenTelemetry trace and span ids when a span is active (in the router, the request's
span or a batch step's; in a shard, the RPC's or one of its children, since the step thread
runs in the RPC's context).
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str, rank: int | None) -> None:
        super().__init__()
        self._process_name = process_name
        self._rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self._process_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._rank is not None:
            entry["rank"] = self._rank
        ids = _current_span_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _current_span_ids() -> tuple[str, str] | None:
    """(trace id, span id) in W3C hex of the active span, or None outside any span."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def setup_logging(process_name: str, *, rank: int | None = None, json_output: bool = False,
                  level: str = "INFO") -> None:
    """Route all records of this process to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(_JsonFormatter(process_name, rank))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp access logs are noisy at INFO; grpc and asyncio log every call or
    # loop at DEBUG, which would bury shardgen's own debug lines (one per step).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.INFO))
