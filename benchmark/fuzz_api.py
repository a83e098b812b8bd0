#!/usr/bin/env python3
"""Fuzz the HTTP API from its own /openapi.json with schemathesis, against the real stack.

  .venv/bin/python benchmark/fuzz_api.py --max-examples 100 --out /tmp/fuzz

Builds a tiny random Qwen2 that carries ../shared/tokenizers/qwen2 (so the chat route has
a template), boots the launcher on it (one CPU shard, --api-key, small limits so that a
generated request finishes in milliseconds), then runs `st run` on the server's
/openapi.json with every check that applies to this API. GET /v1/kv_events is left out:
it is an endless stream by design. Prints the command, the number of test cases and the
failures by check, and writes schemathesis' JSON report and the server log under --out.
The outcome of a run is recorded in docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
QWEN2_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2"
API_KEY = "fuzz-key"
# Checks that hold for this API. Left out: positive_data_acceptance (a schema-valid body
# may still break a rule between fields or the token limits, which answer 422 by design),
# ignored_auth/object_level_authorization (one key, no per-object rights) and
# use_after_free/ensure_resource_availability (no created resources).
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance",
          "negative_data_rejection", "missing_required_header", "unsupported_method")
SERVER_FLAGS = ("--max-total-tokens", "64", "--max-input-tokens", "48", "--max-batch-size",
                "16", "--max-batch-prefill-tokens", "512", "--kv-cache-bytes", str(32 * 2**20),
                "--max-concurrent-requests", "32")


def build_model(folder: Path) -> Path:
    """A 2-layer random Qwen2, hidden size 32, over the Qwen2 vocabulary and chat template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN2_TOKENIZER / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def boot(model: Path, port: int, log: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    argv = [sys.executable, "-m", "shardgen.launcher", "--model-id", str(model), "--device",
            "cpu", "--hostname", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
            *SERVER_FLAGS]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the launcher exited with {process.returncode}; see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the server did not start in {timeout_s} s; see {log}")


def fuzz_command(port: int, args: argparse.Namespace) -> list[str]:
    st = Path(sys.executable).with_name("st")
    return [str(st), "run", f"http://127.0.0.1:{port}/openapi.json",
            "--checks", ",".join(CHECKS), "--max-examples", str(args.max_examples),
            "--seed", str(args.seed), "--workers", str(args.workers),
            "--exclude-path", "/v1/kv_events", "--request-timeout", "60",
            "--header", f"Authorization: Bearer {API_KEY}", "--continue-on-failure",
            "--report", "json", "--report-json-path", str(args.out / "schemathesis.json"),
            "--suppress-health-check", "all", "--no-color"]


# Server log lines that mean a request hurt others or the server, though every answer
# was a 4xx: a step the shard refused fails a request and makes the others in it recompute.
BAD_LOG_LINES = ("step failed", "the batching loop failed", "internal error", "Traceback")
# aiohttp's own parser logs a traceback for a header it cannot parse (schemathesis sends a
# NUL byte to probe); the client gets a 400 and nothing else is touched.
HARMLESS = ("BadHttpMessage", "Invalid header value char", "X-Schemathesis-Probe")


def server_log_problems(log: Path) -> list[str]:
    """Lines of the server log that report a failed step or an unexpected exception."""
    lines = log.read_text(errors="replace").splitlines()
    problems = []
    for index, line in enumerate(lines):
        if any(bad in line for bad in BAD_LOG_LINES):
            context = " ".join(lines[index:index + 8])
            if not any(harmless in context for harmless in HARMLESS):
                problems.append(line)
    return problems


def report_counts(report_path: Path) -> dict[str, object]:
    """Test cases and failures from schemathesis' JSON report (schemathesis 4 keys)."""
    if not report_path.is_file():
        return {}
    report = json.loads(report_path.read_text())
    return {"test_cases": report.get("test_cases"), "running_time_s": report.get(
        "running_time")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/shardgen-fuzz"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.out / "model")
    port = free_port()
    server = boot(model, port, args.out / "server.log")
    try:
        command = fuzz_command(port, args)
        print("$", " ".join(command[:1] + ["run"] + command[2:]), flush=True)
        started = time.monotonic()
        code = subprocess.run(command, check=False).returncode
        print(f"schemathesis exit status {code} after {time.monotonic() - started:.0f} s")
        alive = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
        print(f"server alive after the run: {alive}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    crashed = server.returncode not in (0, -signal.SIGTERM)
    print(f"server exit status {server.returncode}"
          f"{' (crashed)' if crashed else ''}; report: {args.out}")
    print(json.dumps(report_counts(args.out / "schemathesis.json")))
    problems = server_log_problems(args.out / "server.log")
    print(f"server log: {len(problems)} failed step(s) or unexpected exception(s)")
    for line in problems[:20]:
        print("  ", line)
    return 1 if code or crashed or not alive or problems else 0


if __name__ == "__main__":
    sys.exit(main())
