"""The shard as the launcher runs it: a process with flags and environment, one socket."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shard_rpc import STORIES, shard_processes, shard_stub, wait_healthy
from shardgen.proto import generate_pb2


def test_serves_on_its_socket_and_stops_on_sigterm() -> None:
    with shard_processes(1, "--num-blocks", "16", "--json-output") as (uds, processes, logs):
        # A socket file left by a killed shard must not stop the next one.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(f"{uds}-0")
        stale.close()
        wait_healthy(uds, processes, logs)
        stub = shard_stub(uds, 0)
        info = stub.Info(generate_pb2.InfoRequest())
        assert (info.model_id, info.rank, info.world_size) == (str(STORIES), 0, 1)
        assert stub.Warmup(generate_pb2.WarmupRequest(max_batch_prefill_tokens=32, max_batch_size=2,
                                                      max_total_tokens=64)).num_blocks == 16
        processes[0].send_signal(signal.SIGTERM)
        assert processes[0].wait(timeout=30) == 0, logs[0].read_text()
        assert not Path(f"{uds}-0").exists()
        records = [json.loads(line) for line in logs[0].read_text().splitlines() if line.startswith("{")]
        assert records and all(r["process"] == "shard" and r["rank"] == 0 for r in records)


def test_a_bad_flag_value_exits_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardgen.shard", "--model-id", str(STORIES), "--uds-path", "/tmp/x",
         "--device", "cpu", "--block-size", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--block-size must be at least 1, got 0" in result.stderr


def test_a_model_it_cannot_serve_exits_with_one_clear_line(tmp_path: Path) -> None:
    """A quantization (or architecture, or checkpoint) the shard cannot load: exit 2 with the
    reason on one log line, not a traceback, which the launcher shows among the shard's last lines."""
    model = tmp_path / "fbgemm"
    shutil.copytree(STORIES, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (model / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "shardgen.shard", "--model-id", str(model), "--uds-path", str(tmp_path / "s"),
         "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"cannot serve {model}: the checkpoint's quant_method 'fbgemm_fp8' is not supported" in result.stderr
    assert "Traceback" not in result.stderr
