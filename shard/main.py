"""shardgen-shard: one tensor-parallel shard of a model, served over gRPC.

    RANK=0 WORLD_SIZE=1 shardgen-shard --model-id PATH --uds-path /tmp/shardgen

The entry point parses the configuration once, joins the process group, loads this
rank's slice of the model, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import torch

from shardgen.common.logging import setup_logging
from shardgen.common.tracing import setup_tracing, shutdown_tracing
from shardgen.shard.config import ConfigError, ShardConfig, parse_config
from shardgen.shard.cuda_graphs import GraphPolicy
from shardgen.shard.distributed import destroy_distributed, init_distributed
from shardgen.shard.faults import FaultInjection
from shardgen.shard.kv_cache import kv_cache_dtype
from shardgen.shard.models import load_model
from shardgen.shard.runner import MemoryPolicy, ModelFacts, ModelRunner
from shardgen.shard.server import ShardServicer, serve_until

logger = logging.getLogger("shardgen.shard")


def device_of(config: ShardConfig) -> torch.device:
    """CUDA ranks use the GPU whose index is their rank."""
    return torch.device("cuda", config.rank) if config.device_type == "cuda" else torch.device("cpu")


def build_runner(config: ShardConfig) -> ModelRunner:
    """Join the process group and load this rank's model."""
    device = device_of(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    process_group = init_distributed(config.rank, config.world_size, config.master_addr,
                                     config.master_port, device, config.distributed_timeout_s)
    dtype = getattr(torch, config.dtype)
    try:
        model = load_model(config.model_id, dtype=dtype, device=device, rank=config.rank,
                           world_size=config.world_size, process_group=process_group,
                           kernel_backend=config.kernel_backend, quantize=config.quantize)
    except ValueError as error:   # the model, its checkpoint or the flags: the user's to change
        raise ConfigError(f"cannot serve {config.model_id}: {error}") from error
    facts = ModelFacts.read(config.model_id, model)
    logger.info("loaded %s (%s, %s%s on %s, rank %d of %d)", config.model_id, facts.architecture,
                config.dtype, f", {config.quantize} weights" if config.quantize else "", device, config.rank,
                config.world_size)
    memory = MemoryPolicy(config.block_size, config.kv_cache_bytes, config.num_blocks,
                          config.cuda_memory_fraction)
    graphs = GraphPolicy(config.cuda_graphs, config.cuda_graph_max_batch_size,
                         config.cuda_graph_max_prefill_tokens)
    return ModelRunner(model, facts, memory, device=device, dtype=dtype, rank=config.rank,
                       graphs=graphs, run_ahead=config.run_ahead,
                       kv_cache_dtype=kv_cache_dtype(config.kv_cache_dtype))


async def run(config: ShardConfig, faults: FaultInjection | None = None) -> None:
    """Serve until SIGTERM or SIGINT; faults: test-only fault injection (shard/faults.py)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = build_runner(config)
    if faults is not None:
        faults.install(runner)
    await serve_until(stop, ShardServicer(runner, config), config)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = parse_config(argv, os.environ)
        faults = FaultInjection.from_env(os.environ)
    except (ConfigError, ValueError) as error:
        print(f"shardgen-shard: error: {error}", file=sys.stderr)
        sys.exit(2)
    setup_logging("shard", rank=config.rank, json_output=config.json_output, level=config.log_level)
    setup_tracing(config.otlp_service_name, config.otlp_endpoint,
                  attributes={"shardgen.rank": config.rank})
    try:
        asyncio.run(run(config, faults))
    except ConfigError as error:
        logger.error("%s", error)
        sys.exit(2)
    finally:
        shutdown_tracing()
        destroy_distributed()
    logger.info("stopped")


if __name__ == "__main__":
    main()
