"""The launcher's configuration: parsed once from argv into a frozen object.

Router flags are declared here as data (`ROUTER_FLAGS`) and forwarded only when the user set
them, so each default lives in one place: the process that uses it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from shardgen.router.scheduler import SCHEDULING_POLICIES
from shardgen.shard.config import KV_CACHE_DTYPES, QUANTIZE_CHOICES


@dataclass(frozen=True)
class ForwardedFlag:
    """A flag the launcher accepts and hands to a child process unchanged."""

    name: str                    # "--max-batch-size"
    type: type = int
    help: str = ""
    is_switch: bool = False      # a store_true flag
    choices: tuple[str, ...] | None = None


ROUTER_FLAGS: tuple[ForwardedFlag, ...] = (
    ForwardedFlag("--max-concurrent-requests",
                  help="Requests in the engine before new ones get 429 (default: 128; on a GPU twice the batch size)."),
    ForwardedFlag("--max-best-of", help="Largest best_of a request may ask for."),
    ForwardedFlag("--max-stop-sequences", help="Largest number of stop sequences per request."),
    ForwardedFlag("--max-top-n-tokens", help="Largest top_n_tokens per request."),
    ForwardedFlag("--max-input-tokens", help="Longest prompt in tokens (default from the model)."),
    ForwardedFlag("--max-total-tokens",
                  help="Longest prompt + generation (default from the model; on a GPU as far as the KV cache holds)."),
    ForwardedFlag("--max-batch-prefill-tokens",
                  help="Prompt tokens computed in one step (default: 4096; 8192 on a GPU of 64 GiB or more)."),
    ForwardedFlag("--max-batch-total-tokens",
                  help="Tokens held in the KV cache at once (default: what warm-up finds)."),
    ForwardedFlag("--max-batch-size", help="Requests in one step (default: no limit on CPU; 256 on a GPU)."),
    ForwardedFlag("--waiting-served-ratio", type=float, help="Waiting/running ratio that triggers a prefill."),
    ForwardedFlag("--max-waiting-tokens", help="Decode steps a waiting request may be held back."),
    ForwardedFlag("--payload-limit", help="Largest HTTP body in bytes."),
    ForwardedFlag("--disable-prefix-caching", is_switch=True, help="Do not reuse KV blocks across requests."),
    ForwardedFlag("--scheduling-policy", type=str, choices=SCHEDULING_POLICIES,
                  help="Order in which waiting requests start (default shortest-prefill)."),
    ForwardedFlag("--tokenizer-workers", help="Router threads that encode long prompts in parallel."),
    ForwardedFlag("--api-key", type=str, help="Require this Bearer token on every API route."),
    ForwardedFlag("--request-timeout", type=float, help="Seconds a generation request may take (504 past it)."),
    ForwardedFlag("--parse-special-tokens", is_switch=True,
                  help="Parse special-token strings in `inputs` as the special tokens (TGI's behaviour)."),
    ForwardedFlag("--otlp-endpoint", type=str,
                  help="OTLP traces endpoint (gRPC host:port or http(s)://…/v1/traces)."),
    ForwardedFlag("--otlp-service-name", type=str, help="Service name of the traces."),
)

SHARD_FLAGS: tuple[ForwardedFlag, ...] = (
    ForwardedFlag("--block-size", help="Tokens per KV block."),
    ForwardedFlag("--kv-cache-bytes", help="KV cache size on CPU, in bytes."),
    ForwardedFlag("--num-blocks", help="Force this many KV blocks (overrides the memory sizing)."),
    ForwardedFlag("--cuda-memory-fraction", type=float, help="Share of GPU memory the shard may use."),
    ForwardedFlag("--distributed-timeout-s", help="Timeout of collective operations."),
    ForwardedFlag("--kernel-backend", type=str,
                  help="Hot-path ops: auto (Triton on CUDA, torch on CPU), triton or torch."),
    ForwardedFlag("--cuda-graphs", is_switch=True,
                  help="Capture decode steps as CUDA graphs (default on CUDA)."),
    ForwardedFlag("--no-cuda-graphs", is_switch=True, help="Run decode steps eagerly."),
    ForwardedFlag("--cuda-graph-max-batch-size", help="Largest decode batch captured in a graph."),
    ForwardedFlag("--cuda-graph-max-prefill-tokens",
                  help="Largest prefill or mixed step (tokens) replayed from a graph; 0: none."),
    ForwardedFlag("--kv-cache-dtype", type=str, choices=KV_CACHE_DTYPES,
                  help="KV cache storage: auto (the model's dtype) or fp8 (e4m3, unscaled: half the bytes)."),
    ForwardedFlag("--quantize", type=str, choices=QUANTIZE_CHOICES,
                  help="Quantize the projections' weights at load: fp8 (e4m3, per-channel scales; "
                       "GEMMs on fp8 tensor cores). A checkpoint stored in fp8 needs none."),
    ForwardedFlag("--run-ahead", is_switch=True,
                  help="Launch each next decode step before answering (default on CUDA)."),
    ForwardedFlag("--no-run-ahead", is_switch=True, help="Run one step per call, nothing ahead."),
    ForwardedFlag("--otlp-endpoint", type=str, help=argparse.SUPPRESS),
    ForwardedFlag("--otlp-service-name", type=str, help=argparse.SUPPRESS),
)


@dataclass(frozen=True)
class LauncherConfig:
    model_id: str | None
    revision: str | None
    num_shard: int | None
    hostname: str
    port: int
    dtype: str
    device: str
    uds_path: str | None
    master_addr: str
    master_port: int | None
    startup_timeout_s: float
    graceful_termination_timeout_s: float
    json_output: bool
    log_level: str
    router_args: tuple[str, ...] = field(default=())
    shard_args: tuple[str, ...] = field(default=())


def _flag_dest(flag: ForwardedFlag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


def _add_forwarded(parser: argparse.ArgumentParser, flags: tuple[ForwardedFlag, ...],
                   seen: set[str]) -> None:
    for flag in flags:
        if flag.name in seen:
            continue
        seen.add(flag.name)
        if flag.is_switch:
            parser.add_argument(flag.name, action="store_true", default=None, help=flag.help)
        else:
            parser.add_argument(flag.name, type=flag.type, default=None, help=flag.help,
                                choices=flag.choices)


def _forwarded_argv(args: argparse.Namespace, flags: tuple[ForwardedFlag, ...]) -> tuple[str, ...]:
    argv: list[str] = []
    for flag in flags:
        value = getattr(args, _flag_dest(flag))
        if value is None:
            continue
        argv += [flag.name] if flag.is_switch else [flag.name, str(value)]
    return tuple(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgen-launcher",
        description="Serve a model: one shard per GPU (or N on CPU) and an HTTP router.")
    parser.add_argument("--model-id", default=None,
                        help="A local model folder or a hub id. Without it, a built-in demo model "
                             "with random weights is served.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model-id.")
    parser.add_argument("--num-shard", type=int, default=None,
                        help="Tensor-parallel shards (default: every visible GPU, or 1 on CPU).")
    parser.add_argument("--hostname", default="0.0.0.0", help="Address the HTTP server binds.")
    parser.add_argument("--port", type=int, default=3000, help="HTTP port.")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="Compute dtype (auto: bfloat16 on GPU, float32 on CPU).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="Where the shards run (auto: CUDA when present).")
    parser.add_argument("--uds-path", default=None,
                        help="Prefix of the shards' unix sockets (default: a fresh /tmp path).")
    parser.add_argument("--master-addr", default="127.0.0.1", help="torch.distributed address.")
    parser.add_argument("--master-port", type=int, default=None,
                        help="torch.distributed port (default: a free one).")
    parser.add_argument("--startup-timeout", type=float, default=600.0, dest="startup_timeout_s",
                        help="Seconds to wait for the shards to load and answer Health.")
    parser.add_argument("--graceful-termination-timeout", type=float, default=90.0,
                        dest="graceful_termination_timeout_s",
                        help="Seconds in-flight requests get to finish after SIGTERM.")
    parser.add_argument("--json-output", action="store_true", help="JSON logs from every process.")
    parser.add_argument("--log-level", default="info", help="Log level of every process.")
    seen: set[str] = set()
    _add_forwarded(parser, ROUTER_FLAGS, seen)
    _add_forwarded(parser, SHARD_FLAGS, seen)
    return parser


def parse_args(argv: list[str] | None = None) -> LauncherConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_shard is not None and args.num_shard < 1:
        parser.error(f"--num-shard must be at least 1, got {args.num_shard}")
    return LauncherConfig(
        model_id=args.model_id,
        revision=args.revision,
        num_shard=args.num_shard,
        hostname=args.hostname,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        uds_path=args.uds_path,
        master_addr=args.master_addr,
        master_port=args.master_port,
        startup_timeout_s=args.startup_timeout_s,
        graceful_termination_timeout_s=args.graceful_termination_timeout_s,
        json_output=args.json_output,
        log_level=args.log_level,
        router_args=_forwarded_argv(args, ROUTER_FLAGS),
        shard_args=_forwarded_argv(args, SHARD_FLAGS),
    )
