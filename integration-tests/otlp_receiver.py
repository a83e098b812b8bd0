"""A minimal OTLP/gRPC trace receiver that writes every span it gets as one JSON line.

Run as a process (`python otlp_receiver.py --out spans.jsonl`): it listens on a free
loopback port, prints that port on its first stdout line, and serves OpenTelemetry's
TraceService until SIGTERM. `OtlpReceiver` starts and reads it from tests and benchmarks.

Each line: trace_id, span_id, parent_span_id (hex; "" for a root), name, kind
("SPAN_KIND_SERVER"...), start/end_time_unix_nano, attributes, links [{trace_id, span_id,
attributes}], status {code, message}, resource (attributes of the exporting process) and
scope (the instrumentation's name).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

Span = dict[str, Any]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def span_record(span: trace_pb2.Span, resource: dict[str, Any], scope: str) -> Span:
    """One received span as plain JSON-able data."""
    return {
        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(), "name": span.name,
        "kind": trace_pb2.Span.SpanKind.Name(span.kind),
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "attributes": _attributes(span.attributes),
        "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                   "attributes": _attributes(link.attributes)} for link in span.links],
        "status": {"code": trace_pb2.Status.StatusCode.Name(span.status.code),
                   "message": span.status.message},
        "resource": resource, "scope": scope,
    }


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        lines = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                lines += [json.dumps(span_record(span, resource, scope_spans.scope.name))
                          for span in scope_spans.spans]
        with self._lock:
            self._out.write("".join(line + "\n" for line in lines))
            self._out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def serve(out_path: Path) -> None:
    """Receive until SIGTERM/SIGINT; the port goes to stdout first."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open(out_path, "a") as out:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(out), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        stop.wait()
        server.stop(grace=2).wait()


class OtlpReceiver:
    """The receiver as a child process; `endpoint` is what --otlp-endpoint takes."""

    def __init__(self, out_path: Path) -> None:
        self.out_path = out_path
        out_path.touch()
        self.process = subprocess.Popen([sys.executable, __file__, "--out", str(out_path)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the OTLP receiver did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{int(line)}"

    def spans(self) -> list[Span]:
        """Every span received so far."""
        text = self.out_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_for(self, done: Callable[[list[Span]], bool], timeout_s: float = 30.0) -> list[Span]:
        """Poll until done(spans) holds; the spans then (raises TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(spans)} spans received, not the expected ones: "
                                   f"{sorted({span['name'] for span in spans})}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    serve(parser.parse_args().out)


if __name__ == "__main__":
    main()
