"""Log set-up shared by the launcher, the router and the shards.

Each process calls `setup_logging` once at its entry point. Plain output is one line per
record; `--json-output` gives one JSON object per line with the process, its rank and the
current OpenTelemetry trace id when a span is active.
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
        trace_id = _current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _current_trace_id() -> str | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


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
    # grpc and aiohttp access logs are noisy at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
