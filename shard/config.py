"""The shard's configuration: parsed once, at the process entry, into a frozen object.

Command-line flags give the model and the serving knobs; the tensor-parallel placement
comes from the environment the launcher sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
Nothing else in the shard reads argv or the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_KERNEL_BACKENDS = ("auto", "triton", "torch")
KV_CACHE_DTYPES = ("auto", "fp8")
QUANTIZE_CHOICES = ("fp8",)   # shard/layers/quant.py (not imported here: it needs torch)
_DEFAULT_KV_CACHE_BYTES = 1 << 30


class ConfigError(ValueError):
    """A flag or environment value that the shard cannot run with."""


@dataclass(frozen=True)
class ShardConfig:
    """Everything a shard process needs to know, resolved (no "auto" left)."""

    model_id: str
    uds_path: str
    dtype: str                  # "float32" | "float16" | "bfloat16"
    device_type: str            # "cpu" | "cuda"
    block_size: int
    kv_cache_bytes: int         # KV cache size on CPU
    num_blocks: int | None      # forces the KV cache size when set (block 0 included)
    cuda_memory_fraction: float
    distributed_timeout_s: float
    json_output: bool
    log_level: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    otlp_endpoint: str | None = None
    otlp_service_name: str | None = None
    kernel_backend: str = "torch"       # "triton" | "torch": the hot-path ops (shard/layers/ops.py)
    cuda_graphs: bool = False           # capture decode steps as CUDA graphs at warm-up
    cuda_graph_max_batch_size: int = 256
    cuda_graph_max_prefill_tokens: int = 2048
    run_ahead: bool = False             # launch the next decode before answering (generate.proto)
    kv_cache_dtype: str = "auto"        # "auto": the model's dtype | "fp8": float8 e4m3, unscaled
    quantize: str | None = None         # "fp8": the projections' weights in e4m3 (shard/layers/quant.py)

    @property
    def socket_path(self) -> str:
        """This rank's unix socket file."""
        return socket_path(self.uds_path, self.rank)

    @property
    def address(self) -> str:
        """This rank's gRPC address."""
        return f"unix://{self.socket_path}"

    def shard_addresses(self) -> list[str]:
        """The gRPC addresses of every rank, in rank order."""
        return [f"unix://{socket_path(self.uds_path, rank)}" for rank in range(self.world_size)]


def socket_path(uds_path: str, rank: int) -> str:
    """The socket file of `rank` under the launcher's prefix."""
    return f"{uds_path}-{rank}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgen-shard",
        description="One model shard: a tensor-parallel slice of the model and its KV cache, "
                    "served over gRPC on a unix socket.")
    parser.add_argument("--model-id", required=True, help="Local model folder.")
    parser.add_argument("--uds-path", required=True,
                        help="Socket prefix; this rank listens on PREFIX-RANK.")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES,
                        help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU).")
    parser.add_argument("--device", default="auto", choices=_DEVICES,
                        help="auto: CUDA when available; CUDA uses GPU index = rank.")
    parser.add_argument("--block-size", type=int, default=16, help="Tokens per KV block.")
    parser.add_argument("--kv-cache-bytes", type=int, default=_DEFAULT_KV_CACHE_BYTES,
                        help="KV cache size on CPU, in bytes.")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="Force this many KV blocks, block 0 included (overrides sizing).")
    parser.add_argument("--cuda-memory-fraction", type=float, default=0.9,
                        help="Share of the GPU's memory the shard may use in total.")
    parser.add_argument("--distributed-timeout-s", type=float, default=600.0,
                        help="Timeout of collective operations, in seconds.")
    parser.add_argument("--kernel-backend", default="auto", choices=_KERNEL_BACKENDS,
                        help="Hot-path ops: Triton kernels or the torch reference (auto: Triton "
                             "on CUDA, torch on CPU).")
    parser.add_argument("--cuda-graphs", default=None, action=argparse.BooleanOptionalAction,
                        help="Replay decode steps as CUDA graphs (default: on for one CUDA rank "
                             "with the Triton kernels).")
    parser.add_argument("--cuda-graph-max-batch-size", type=int,
                        default=ShardConfig.cuda_graph_max_batch_size,
                        help="Largest decode batch captured as a graph; larger ones run eagerly.")
    parser.add_argument("--cuda-graph-max-prefill-tokens", type=int,
                        default=ShardConfig.cuda_graph_max_prefill_tokens,
                        help="Largest prefill or mixed step (in tokens) replayed from a graph; 0: "
                             "none, they all run eagerly.")
    parser.add_argument("--run-ahead", default=None, action=argparse.BooleanOptionalAction,
                        help="Launch the next decode step before answering the router's call, when "
                             "it asks (default: on for CUDA, where it hides the host's work).")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="What the KV cache stores: auto (the model's dtype) or fp8 (float8 "
                             "e4m3, unscaled: half the bytes per token, values saturate at +-448).")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="Quantize the projections' weights when loading: fp8 (float8 e4m3, a "
                             "scale per output channel; inputs quantized per token) halves their "
                             "bytes and runs the GEMMs on fp8 tensor cores, at some accuracy. A "
                             "checkpoint stored in fp8 (compressed-tensors) loads as fp8 without it.")
    parser.add_argument("--json-output", action="store_true", help="One JSON object per log line.")
    parser.add_argument("--log-level", default="info", help="Log level (debug, info, warning...).")
    # Forwarded by the launcher with its router flags; accepted so that the command line
    # stays one list, not yet used by the shard (it exports no spans of its own).
    parser.add_argument("--otlp-endpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--otlp-service-name", default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str],
                 *, cuda_available: bool | None = None) -> ShardConfig:
    """Parse flags and the distributed environment; raise ConfigError on bad values.

    `cuda_available` resolves `--device auto`; None asks torch (imported only then).
    """
    args = build_parser().parse_args(argv)
    rank = _env_int(env, "RANK", 0)
    world_size = _env_int(env, "WORLD_SIZE", 1)
    master_port = _env_int(env, "MASTER_PORT", 29500)
    _check(world_size >= 1, f"WORLD_SIZE must be at least 1, got {world_size}")
    _check(0 <= rank < world_size, f"RANK must be in [0, {world_size}), got {rank}")
    _check(args.block_size >= 1, f"--block-size must be at least 1, got {args.block_size}")
    _check(args.kv_cache_bytes >= 1,
           f"--kv-cache-bytes must be positive, got {args.kv_cache_bytes}")
    _check(args.num_blocks is None or args.num_blocks >= 2,
           f"--num-blocks must be at least 2 (block 0 is reserved), got {args.num_blocks}")
    _check(0.0 < args.cuda_memory_fraction <= 1.0,
           f"--cuda-memory-fraction must be in (0, 1], got {args.cuda_memory_fraction}")
    _check(args.distributed_timeout_s > 0,
           f"--distributed-timeout-s must be positive, got {args.distributed_timeout_s}")
    _check(args.cuda_graph_max_batch_size >= 1,
           f"--cuda-graph-max-batch-size must be at least 1, got {args.cuda_graph_max_batch_size}")
    _check(args.cuda_graph_max_prefill_tokens >= 0,
           f"--cuda-graph-max-prefill-tokens must be >= 0, got {args.cuda_graph_max_prefill_tokens}")
    device_type = _resolve_device(args.device, cuda_available)
    kernel_backend = _resolve_kernel_backend(args.kernel_backend, device_type)
    dtype = _resolve_dtype(args.dtype, device_type)
    _check(args.quantize is None or device_type == "cpu" or dtype == "bfloat16",
           f"--quantize {args.quantize} computes in bfloat16 on CUDA, got --dtype {dtype}")
    return ShardConfig(
        model_id=args.model_id,
        uds_path=args.uds_path,
        dtype=dtype,
        device_type=device_type,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        num_blocks=args.num_blocks,
        cuda_memory_fraction=args.cuda_memory_fraction,
        distributed_timeout_s=args.distributed_timeout_s,
        json_output=args.json_output,
        log_level=args.log_level,
        rank=rank,
        world_size=world_size,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=master_port,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name,
        kernel_backend=kernel_backend,
        cuda_graphs=_resolve_cuda_graphs(args.cuda_graphs, device_type, kernel_backend),
        cuda_graph_max_batch_size=args.cuda_graph_max_batch_size,
        cuda_graph_max_prefill_tokens=args.cuda_graph_max_prefill_tokens,
        run_ahead=device_type == "cuda" if args.run_ahead is None else args.run_ahead,
        kv_cache_dtype=args.kv_cache_dtype,
        quantize=args.quantize,
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _resolve_device(device: str, cuda_available: bool | None) -> str:
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    return device


def _resolve_kernel_backend(backend: str, device_type: str) -> str:
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return backend


def _resolve_cuda_graphs(asked: bool | None, device_type: str, kernel_backend: str) -> bool:
    """Default: on for CUDA with the Triton kernels, one rank or several (the graphs of a
    tensor-parallel rank hold its NCCL all-reduces: on two H200s they gave the tokens of one
    GPU in fp32, and 3.5 ms per token against ~36 eager; benchmark/NOTES.md, issue 9)."""
    possible = device_type == "cuda" and kernel_backend == "triton"
    if asked is None:
        return possible
    if asked and not possible:
        raise ConfigError(f"--cuda-graphs needs --device cuda and --kernel-backend triton, got "
                          f"device {device_type} and kernel backend {kernel_backend}")
    return asked


def _resolve_dtype(dtype: str, device_type: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype
