"""The launcher owns its children: a dead shard stops everything; SIGTERM stops cleanly."""

from __future__ import annotations

import glob
import os
import re
import signal
import time

import psutil
import pytest
import requests

from harness import STORIES, Server

pytestmark = pytest.mark.integration


def _children(server: Server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


def _shard_uds_prefix(server: Server) -> str:
    match = re.search(r"sockets (\S+)-\{rank\}", server.logs())
    assert match, server.logs()
    return match.group(1)


def test_sigterm_stops_every_process_and_removes_sockets(tmp_path) -> None:
    server = Server("--model-id", str(STORIES), "--num-shard", "2", log_path=tmp_path / "log")
    children = _children(server)
    prefix = _shard_uds_prefix(server)
    assert len(glob.glob(f"{prefix}-*")) == 2
    assert server.stop() == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert glob.glob(f"{prefix}-*") == []


def test_a_killed_shard_stops_the_launcher_with_its_last_lines(tmp_path) -> None:
    server = Server("--model-id", str(STORIES), "--num-shard", "2", log_path=tmp_path / "log")
    children = _children(server)
    shard = next(p for p in children if "shardgen.shard" in " ".join(p.cmdline())
                 and p.environ().get("RANK") == "1")
    os.kill(shard.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.process.returncode not in (None, 0)
    logs = server.logs()
    assert "shard 1 exited unexpectedly (killed by SIGKILL)" in logs
    assert "its last lines:" in logs
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive
    server.stop()


def test_demo_model_serves_without_model_id(tmp_path) -> None:
    server = Server(log_path=tmp_path / "log", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        assert "DEMO model with RANDOM weights" in server.logs()
        response = requests.post(f"{server.url}/generate",
                                 json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}},
                                 timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
