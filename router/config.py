"""The router's configuration: parsed once from argv at the process entry.

`parse_args` turns the command line into a frozen `RouterConfig`. Some limits depend on the
model (its longest sequence) or on the shards' KV capacity and are unknown until the shards
answer; those fields hold None after parsing, and `resolve_limits` fills them in and checks
them once the router has the shards' Info and Warmup answers.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from shardgen.router.scheduler import SCHEDULING_POLICIES
from shardgen.router.tokenization import DEFAULT_WORKERS

# TGI's default ceiling on the longest sequence when the model allows more (on a CPU; a
# GPU serves the model's whole context by default, `_default_max_total_tokens`).
DEFAULT_MAX_TOTAL_TOKENS = 4096
# Prompt tokens computed in one step by default; longer prompts are prefilled in chunks.
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
# TGI's default number of requests in the server (queued or running) before 429.
DEFAULT_MAX_CONCURRENT_REQUESTS = 128
# On a GPU the defaults follow the device (see `device_defaults`): steps of up to the batch
# the shards' CUDA graphs cover by default, and on a GPU of LARGE_GPU_BYTES or more (H100,
# H200, A100 80 GB) prompt steps of LARGE_GPU_PREFILL_TOKENS, as vLLM picks for such GPUs.
GPU_MAX_BATCH_SIZE = 256
LARGE_GPU_BYTES = 64 * 2**30
LARGE_GPU_PREFILL_TOKENS = 8192


class ConfigError(ValueError):
    """A setting contradicts another one or a limit of the model."""


@dataclass(frozen=True)
class RouterConfig:
    """Every setting of the router process.

    The token limits that are None after `parse_args` derive from the model and the
    shards; `resolve_limits` returns a copy where none of them is None.
    """

    model_id: str
    tokenizer: str
    # The name /info reports (the launcher passes the hub id it resolved to model_id).
    served_model_name: str = ""
    uds_path: str = "/tmp/shardgen-server"
    num_shard: int = 1
    hostname: str = "127.0.0.1"
    port: int = 3000
    # None until `resolve_limits`: it depends on the shards' device (`device_defaults`).
    max_concurrent_requests: int | None = None
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    enable_prefix_caching: bool = True
    scheduling_policy: str = "shortest-prefill"
    # Requests that do not say max_new_tokens get this many at most.
    default_max_new_tokens: int = 100
    payload_limit: int = 2_000_000
    # Seconds that running requests get to finish after SIGTERM/SIGINT.
    drain_timeout_s: float = 30.0
    # Longest time a generation request may take from its arrival (None: no limit); a
    # request may ask for less with the x-request-timeout header.
    request_timeout_s: float | None = None
    # Parse special-token strings in `inputs` as the special tokens (TGI's behaviour);
    # False encodes them as plain text, so a prompt cannot forge control tokens.
    parse_special_tokens: bool = False
    # Threads that encode long prompts, in parallel (one core each); see
    # tokenization.DEFAULT_WORKERS for why one is the default.
    tokenizer_workers: int = DEFAULT_WORKERS
    # Bearer token every API route requires; None leaves the API open.
    api_key: str | None = None
    otlp_endpoint: str | None = None
    # None: OTEL_SERVICE_NAME, else "shardgen" (common.tracing decides).
    otlp_service_name: str | None = None
    # Seconds to wait for the shards' Health, and separately for their warm-up.
    shard_timeout_s: float = 600.0
    json_output: bool = False
    log_level: str = "info"

    def limits_resolved(self) -> bool:
        """True once `resolve_limits` has filled every model-dependent limit."""
        return None not in (self.max_input_tokens, self.max_total_tokens,
                            self.max_batch_prefill_tokens, self.max_batch_total_tokens,
                            self.max_concurrent_requests)


@dataclass(frozen=True)
class DeviceDefaults:
    """The defaults of the batch limits on the shards' device, for the flags not given."""

    max_batch_prefill_tokens: int
    max_batch_size: int | None  # None: no limit but the KV cache and the concurrency
    max_concurrent_requests: int


def device_defaults(device_type: str, device_memory_bytes: int,
                    max_batch_size: int | None = None) -> DeviceDefaults:
    """Batch limits sized from the device that the shards' Info reports.

    A CPU keeps TGI's defaults. A GPU batches up to GPU_MAX_BATCH_SIZE requests per step
    (what the CUDA graphs cover; `max_batch_size` when the user gave one) and admits twice
    that, at least TGI's 128, so that a full batch has its successors queued; a GPU of
    LARGE_GPU_BYTES or more also computes LARGE_GPU_PREFILL_TOKENS prompt tokens per step
    (256 requests of 1,024-token prompts ran 2.4% faster than at 4,096 on an H100 at
    concurrency 256 and 9.1% at 64; benchmark/NOTES.md, thirteenth pass).
    """
    if device_type != "cuda":
        return DeviceDefaults(DEFAULT_MAX_BATCH_PREFILL_TOKENS, None, DEFAULT_MAX_CONCURRENT_REQUESTS)
    prefill = (LARGE_GPU_PREFILL_TOKENS if device_memory_bytes >= LARGE_GPU_BYTES
               else DEFAULT_MAX_BATCH_PREFILL_TOKENS)
    batch = max_batch_size or GPU_MAX_BATCH_SIZE
    return DeviceDefaults(prefill, GPU_MAX_BATCH_SIZE,
                          max(DEFAULT_MAX_CONCURRENT_REQUESTS, 2 * batch))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `shardgen-router` command line (TGI's router flags, same names and defaults)."""
    defaults = RouterConfig(model_id="", tokenizer="")
    p = argparse.ArgumentParser(
        prog="shardgen-router",
        description="HTTP front end of shardgen: validation, tokenization, batching, streaming.")
    p.add_argument("--model-id", required=True, help="model folder the shards loaded")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model-id)")
    p.add_argument("--served-model-name", default=None,
                   help="model name that /info reports (default: --model-id)")
    p.add_argument("--uds-path", default=defaults.uds_path,
                   help="prefix of the shards' unix sockets; shard i listens on PREFIX-i")
    p.add_argument("--num-shard", type=_positive_int, default=defaults.num_shard)
    p.add_argument("--hostname", default=defaults.hostname)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--max-concurrent-requests", type=_positive_int, default=None,
                   help=f"requests in the server (queued or running) before new ones get 429 "
                        f"(default: {DEFAULT_MAX_CONCURRENT_REQUESTS}; on a GPU twice the batch "
                        f"size, at least {DEFAULT_MAX_CONCURRENT_REQUESTS})")
    p.add_argument("--max-best-of", type=_positive_int, default=defaults.max_best_of)
    p.add_argument("--max-stop-sequences", type=_non_negative_int,
                   default=defaults.max_stop_sequences)
    p.add_argument("--max-top-n-tokens", type=_non_negative_int,
                   default=defaults.max_top_n_tokens)
    p.add_argument("--max-input-tokens", type=_positive_int, default=None,
                   help="default: --max-total-tokens minus 1")
    p.add_argument("--max-total-tokens", type=_positive_int, default=None,
                   help=f"default: min(max_position_embeddings, {DEFAULT_MAX_TOTAL_TOKENS}); on a "
                        f"GPU max_position_embeddings, or what the KV cache holds if less")
    p.add_argument("--max-batch-prefill-tokens", type=_positive_int, default=None,
                   help=f"prompt tokens computed in one step; longer prompts are chunked "
                        f"(default: {DEFAULT_MAX_BATCH_PREFILL_TOKENS}; "
                        f"{LARGE_GPU_PREFILL_TOKENS} on a GPU of {LARGE_GPU_BYTES // 2**30} GiB "
                        f"or more)")
    p.add_argument("--max-batch-total-tokens", type=_positive_int, default=None,
                   help="default: every KV slot the shards report at warm-up")
    p.add_argument("--max-batch-size", type=_positive_int, default=None,
                   help=f"requests in one step (default: no limit but the KV cache and "
                        f"--max-concurrent-requests; {GPU_MAX_BATCH_SIZE} on a GPU)")
    p.add_argument("--waiting-served-ratio", type=_non_negative_float,
                   default=defaults.waiting_served_ratio)
    p.add_argument("--max-waiting-tokens", type=_non_negative_int,
                   default=defaults.max_waiting_tokens)
    p.add_argument("--disable-prefix-caching", action="store_true")
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES,
                   default=defaults.scheduling_policy,
                   help="order in which waiting requests start: fewest prompt tokens left to "
                        "compute first (after the cached prefix), or arrival order")
    p.add_argument("--default-max-new-tokens", type=_positive_int,
                   default=defaults.default_max_new_tokens,
                   help="max_new_tokens of requests that do not give one")
    p.add_argument("--payload-limit", type=_positive_int, default=defaults.payload_limit,
                   help="largest request body in bytes")
    p.add_argument("--drain-timeout", type=_non_negative_float, default=defaults.drain_timeout_s,
                   help="seconds running requests get to finish on SIGTERM/SIGINT")
    p.add_argument("--request-timeout", type=_positive_float, default=None,
                   help="seconds a generation request may take from its arrival; longer ones "
                        "end with 504 (default: no limit; the x-request-timeout header may "
                        "ask for less)")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="tokenize special-token strings written in `inputs` (e.g. </s>) as "
                        "the special tokens, as TGI does (default: as plain text)")
    p.add_argument("--tokenizer-workers", type=_positive_int, default=defaults.tokenizer_workers,
                   help="threads that encode long prompts in parallel")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every API route")
    p.add_argument("--otlp-endpoint", default=None, help="OTLP traces endpoint")
    p.add_argument("--otlp-service-name", default=None)
    p.add_argument("--shard-timeout", type=_non_negative_float, default=defaults.shard_timeout_s,
                   help="seconds to wait for the shards to answer, and to warm up")
    p.add_argument("--json-output", action="store_true", help="log one JSON object per line")
    p.add_argument("--log-level", default=defaults.log_level,
                   choices=["debug", "info", "warning", "error", "critical"],
                   type=str.lower)
    return p


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """Parse the command line (sys.argv[1:] when argv is None) into a RouterConfig.

    Exits with status 2 and a usage message on a malformed flag, like any argparse program.
    Limits that can be checked without the model are checked here (ConfigError).
    """
    args = build_parser().parse_args(argv)
    config = RouterConfig(
        model_id=args.model_id,
        tokenizer=args.tokenizer or args.model_id,
        served_model_name=args.served_model_name or args.model_id,
        uds_path=args.uds_path,
        num_shard=args.num_shard,
        hostname=args.hostname,
        port=args.port,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_batch_size=args.max_batch_size,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
        enable_prefix_caching=not args.disable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        default_max_new_tokens=args.default_max_new_tokens,
        payload_limit=args.payload_limit,
        drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.request_timeout,
        parse_special_tokens=args.parse_special_tokens,
        tokenizer_workers=args.tokenizer_workers,
        api_key=args.api_key,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name,
        shard_timeout_s=args.shard_timeout,
        json_output=args.json_output,
        log_level=args.log_level,
    )
    _check_given_limits(config)
    return config


def _check_given_limits(config: RouterConfig) -> None:
    """Checks between flags the user gave (the model's limits come later)."""
    given_input, given_total = config.max_input_tokens, config.max_total_tokens
    if given_input is not None and given_total is not None and given_input >= given_total:
        raise ConfigError(f"--max-input-tokens ({given_input}) must be less than "
                          f"--max-total-tokens ({given_total})")


def resolve_limits(config: RouterConfig, *, max_position_embeddings: int,
                   device_type: str = "cpu", device_memory_bytes: int = 0,
                   kv_capacity_tokens: int | None = None) -> RouterConfig:
    """Fill the limits that were left to the model and the device, and check them all.

    max_position_embeddings, device_type, device_memory_bytes: the shards' Info (the batch
        limits not given default from the device, `device_defaults`).
    kv_capacity_tokens: KV slots the shards can hold (blocks times block size, from Warmup);
        None before warm-up, in which case max_batch_total_tokens stays as given.
    Raises ConfigError naming the flag, its value and the limit it breaks.
    """
    defaults = device_defaults(device_type, device_memory_bytes, config.max_batch_size)
    concurrent = config.max_concurrent_requests or defaults.max_concurrent_requests
    batch = config.max_batch_size
    if batch is None and defaults.max_batch_size is not None:
        batch = min(defaults.max_batch_size, concurrent)
    total = config.max_total_tokens
    if total is None:
        total = _default_max_total_tokens(config, max_position_embeddings, device_type,
                                          kv_capacity_tokens)
    if total > max_position_embeddings:
        raise ConfigError(f"--max-total-tokens ({total}) exceeds the model's "
                          f"max_position_embeddings ({max_position_embeddings})")
    max_input = config.max_input_tokens if config.max_input_tokens is not None else total - 1
    if max_input >= total:
        raise ConfigError(f"--max-input-tokens ({max_input}) must be less than "
                          f"--max-total-tokens ({total})")
    prefill = config.max_batch_prefill_tokens or defaults.max_batch_prefill_tokens
    batch_total = config.max_batch_total_tokens
    if batch_total is not None:
        _check_batch_total(batch_total, total, kv_capacity_tokens)
    elif kv_capacity_tokens is not None:
        if kv_capacity_tokens < total:
            raise ConfigError(f"the shards' KV cache holds {kv_capacity_tokens} tokens, fewer "
                              f"than one sequence of --max-total-tokens ({total}): lower "
                              f"--max-total-tokens (or --max-input-tokens) or give the shards "
                              f"more KV memory")
        batch_total = kv_capacity_tokens
    return dataclasses.replace(config, max_total_tokens=total, max_input_tokens=max_input,
                               max_batch_prefill_tokens=prefill,
                               max_batch_total_tokens=batch_total, max_batch_size=batch,
                               max_concurrent_requests=concurrent)


def _default_max_total_tokens(config: RouterConfig, max_position_embeddings: int,
                              device_type: str, kv_capacity_tokens: int | None) -> int:
    """The longest sequence when --max-total-tokens is not given: TGI's min(model, 4096) on a
    CPU; on a GPU the model's whole context as far as the KV cache (and
    --max-batch-total-tokens) holds it, as vLLM and TGI 3 do; in both cases at least
    --max-input-tokens + 1."""
    if device_type == "cuda":
        bounds = (max_position_embeddings, kv_capacity_tokens, config.max_batch_total_tokens)
        total = min(bound for bound in bounds if bound is not None)
    else:
        total = min(max_position_embeddings, DEFAULT_MAX_TOTAL_TOKENS)
    if config.max_input_tokens is not None and config.max_input_tokens >= total:
        total = min(max_position_embeddings, config.max_input_tokens + 1)
    return total


def _check_batch_total(batch_total: int, max_total: int, kv_capacity_tokens: int | None) -> None:
    if batch_total < max_total:
        raise ConfigError(f"--max-batch-total-tokens ({batch_total}) must be at least "
                          f"--max-total-tokens ({max_total})")
    if kv_capacity_tokens is not None and batch_total > kv_capacity_tokens:
        raise ConfigError(f"--max-batch-total-tokens ({batch_total}) exceeds the KV capacity "
                          f"of the shards ({kv_capacity_tokens} tokens)")
