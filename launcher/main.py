"""shardgen-launcher: starts the shards, waits until they answer Health, then the router.

It owns the children's lives: if one dies, the others are stopped and the launcher exits
non-zero with that child's last lines; on SIGTERM/SIGINT the router drains first, then the
shards stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from shardgen.common.logging import setup_logging
from shardgen.launcher.config import LauncherConfig, parse_args
from shardgen.launcher.model import ModelResolutionError, resolve_model
from shardgen.launcher.processes import Child, child_env, describe_exit, stop_children
from shardgen.proto import generate_pb2, generate_pb2_grpc

logger = logging.getLogger("shardgen.launcher")

_SHARD_STOP_TIMEOUT_S = 15.0


class ChildDied(RuntimeError):
    def __init__(self, child: Child) -> None:
        returncode = child.returncode
        assert returncode is not None
        tail = "\n".join(f"    {line}" for line in child.last_lines()) or "    (no output)"
        super().__init__(f"{child.name} exited unexpectedly ({describe_exit(returncode)}); "
                         f"its last lines:\n{tail}")
        self.child = child


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _default_num_shard(device: str) -> int:
    if device == "cpu":
        return 1
    import torch  # only to count GPUs

    return max(torch.cuda.device_count(), 1)


def _threads_per_shard(num_shard: int) -> str:
    """Each shard's share of the cores: N shards each running torch's default thread pool
    on all cores oversubscribe them (4x slower steps seen with 4 CPU shards on 2 cores)."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // num_shard))


def _socket_path(uds_path: str, rank: int) -> str:
    return f"{uds_path}-{rank}"


def _shard_argv(config: LauncherConfig, model_path: Path, uds_path: str) -> list[str]:
    argv = [sys.executable, "-m", "shardgen.shard", "--model-id", str(model_path),
            "--uds-path", uds_path, "--dtype", config.dtype, "--device", config.device,
            "--log-level", config.log_level, *config.shard_args]
    return argv + (["--json-output"] if config.json_output else [])


def _router_argv(config: LauncherConfig, model_path: Path, uds_path: str, num_shard: int,
                 served_model_id: str) -> list[str]:
    argv = [sys.executable, "-m", "shardgen.router", "--model-id", str(model_path),
            "--served-model-name", served_model_id, "--uds-path", uds_path,
            "--num-shard", str(num_shard), "--hostname", config.hostname,
            "--port", str(config.port), "--log-level", config.log_level,
            "--drain-timeout", str(config.graceful_termination_timeout_s), *config.router_args]
    return argv + (["--json-output"] if config.json_output else [])


def _shard_is_healthy(uds_path: str, rank: int) -> bool:
    address = f"unix://{_socket_path(uds_path, rank)}"
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        try:
            stub.Health(generate_pb2.HealthRequest(), timeout=5.0)
        except grpc.RpcError:
            return False
    return True


def _wait_for_shards(shards: list[Child], uds_path: str, timeout_s: float,
                     stopping: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = set(range(len(shards)))
    while waiting:
        for shard in shards:
            if shard.returncode is not None:
                raise ChildDied(shard)
        if stopping.is_set():
            return
        for rank in sorted(waiting):
            if Path(_socket_path(uds_path, rank)).exists() and _shard_is_healthy(uds_path, rank):
                logger.info("shard %d is ready", rank)
                waiting.discard(rank)
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards {sorted(waiting)} did not answer Health within "
                               f"{timeout_s:.0f} s (raise --startup-timeout for large models)")
        time.sleep(0.2)


def _supervise(children: list[Child], stopping: threading.Event) -> None:
    """Return when a signal asks to stop; raise ChildDied when a child exits on its own."""
    while not stopping.wait(0.2):
        for child in children:
            if child.returncode is not None:
                raise ChildDied(child)


def run(config: LauncherConfig) -> int:
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        model_path = resolve_model(config.model_id, config.revision)
    except ModelResolutionError as error:
        logger.error("%s", error)
        return 2
    num_shard = config.num_shard or _default_num_shard(config.device)
    uds_path = config.uds_path or tempfile.mktemp(prefix="shardgen-")
    master_port = config.master_port or _free_port(config.master_addr)
    logger.info("serving %s with %d shard(s); sockets %s-{rank}", model_path, num_shard, uds_path)

    shards: list[Child] = []
    router: Child | None = None
    exit_code = 0
    try:
        for rank in range(num_shard):
            env = child_env({"RANK": str(rank), "WORLD_SIZE": str(num_shard),
                             "MASTER_ADDR": config.master_addr, "MASTER_PORT": str(master_port),
                             "OMP_NUM_THREADS": _threads_per_shard(num_shard)})
            shards.append(Child(f"shard {rank}", _shard_argv(config, model_path, uds_path), env,
                                raw_logs=config.json_output))
        _wait_for_shards(shards, uds_path, config.startup_timeout_s, stopping)
        if not stopping.is_set():
            served_id = config.model_id or "shardgen-demo"
            router = Child("router", _router_argv(config, model_path, uds_path, num_shard, served_id),
                           child_env({}), raw_logs=config.json_output)
            _supervise([router, *shards], stopping)
    except ChildDied as died:
        logger.error("%s", died)
        exit_code = 1
    except TimeoutError as error:
        logger.error("%s", error)
        exit_code = 1
    finally:
        if router is not None:
            # The router stops admitting, drains in-flight requests, then exits.
            stop_children([router], config.graceful_termination_timeout_s + 5.0)
        stop_children(shards, _SHARD_STOP_TIMEOUT_S)
        for rank in range(num_shard):
            Path(_socket_path(uds_path, rank)).unlink(missing_ok=True)
    logger.info("stopped")
    return exit_code


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging("launcher", json_output=config.json_output, level=config.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run(config))


if __name__ == "__main__":
    main()
