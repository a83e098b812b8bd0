"""The router's command line and the token limits it derives from the model and the shards."""

from __future__ import annotations

import dataclasses

import pytest

from shardgen.router.config import (DEFAULT_MAX_BATCH_PREFILL_TOKENS, DEFAULT_MAX_TOTAL_TOKENS,
                                    ConfigError, RouterConfig, build_parser, device_defaults,
                                    parse_args, resolve_limits)

GIB = 2**30


def test_defaults() -> None:
    config = parse_args(["--model-id", "/models/m"])
    assert config.tokenizer == "/models/m" and config.served_model_name == "/models/m"
    assert (config.hostname, config.port, config.num_shard) == ("127.0.0.1", 3000, 1)
    assert (config.max_best_of, config.max_stop_sequences, config.max_top_n_tokens) == (2, 4, 5)
    # Left to the shards' device (resolve_limits).
    assert config.max_concurrent_requests is None and config.max_batch_size is None
    assert (config.waiting_served_ratio, config.max_waiting_tokens) == (0.0, 20)
    assert config.payload_limit == 2_000_000
    assert config.enable_prefix_caching and not config.json_output
    assert not config.limits_resolved()


def test_every_flag_reaches_the_config() -> None:
    config = parse_args([
        "--model-id", "/m", "--tokenizer", "/t", "--served-model-name", "org/m",
        "--uds-path", "/tmp/s", "--num-shard", "2", "--hostname", "0.0.0.0", "--port", "8080",
        "--max-concurrent-requests", "7", "--max-best-of", "3", "--max-stop-sequences", "1",
        "--max-top-n-tokens", "0", "--max-input-tokens", "100", "--max-total-tokens", "200",
        "--max-batch-prefill-tokens", "300", "--max-batch-total-tokens", "4000",
        "--max-batch-size", "8", "--waiting-served-ratio", "1.5", "--max-waiting-tokens", "3",
        "--disable-prefix-caching", "--default-max-new-tokens", "50", "--payload-limit", "10",
        "--drain-timeout", "2.5", "--api-key", "k", "--otlp-endpoint", "http://c:4318",
        "--otlp-service-name", "svc", "--shard-timeout", "9", "--json-output",
        "--log-level", "DEBUG"])
    assert config == RouterConfig(
        model_id="/m", tokenizer="/t", served_model_name="org/m", uds_path="/tmp/s",
        num_shard=2, hostname="0.0.0.0", port=8080, max_concurrent_requests=7, max_best_of=3,
        max_stop_sequences=1, max_top_n_tokens=0, max_input_tokens=100, max_total_tokens=200,
        max_batch_prefill_tokens=300, max_batch_total_tokens=4000, max_batch_size=8,
        waiting_served_ratio=1.5, max_waiting_tokens=3, enable_prefix_caching=False,
        default_max_new_tokens=50, payload_limit=10, drain_timeout_s=2.5, api_key="k",
        otlp_endpoint="http://c:4318", otlp_service_name="svc", shard_timeout_s=9.0,
        json_output=True, log_level="debug")


def test_the_router_accepts_every_flag_the_launcher_forwards() -> None:
    launcher = pytest.importorskip("shardgen.launcher.config")
    argv = ["--model-id", "/m", "--served-model-name", "m", "--uds-path", "/tmp/s",
            "--num-shard", "1", "--hostname", "127.0.0.1", "--port", "3000",
            "--log-level", "info", "--json-output"]
    for flag in launcher.ROUTER_FLAGS:
        if flag.is_switch:
            argv.append(flag.name)
        else:
            value = "http://x:1" if flag.type is str else str(flag.type(1))
            argv += [flag.name, flag.choices[-1] if flag.choices else value]
    build_parser().parse_args(argv)  # argparse exits on a flag it does not know


@pytest.mark.parametrize("argv", [
    ["--port", "3000"],                                   # no --model-id
    ["--model-id", "m", "--max-total-tokens", "0"],
    ["--model-id", "m", "--num-shard", "-1"],
    ["--model-id", "m", "--waiting-served-ratio", "nan"],
    ["--model-id", "m", "--log-level", "loud"],
    ["--model-id", "m", "--max-input-tokens", "many"],
])
def test_malformed_flags_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2


def test_input_must_be_shorter_than_total() -> None:
    with pytest.raises(ConfigError, match=r"--max-input-tokens \(10\).*--max-total-tokens \(10\)"):
        parse_args(["--model-id", "m", "--max-input-tokens", "10", "--max-total-tokens", "10"])


def config(**fields: object) -> RouterConfig:
    return dataclasses.replace(RouterConfig(model_id="m", tokenizer="m"), **fields)


def test_limits_default_from_the_model_as_tgi_does() -> None:
    small = resolve_limits(config(), max_position_embeddings=512)
    assert (small.max_total_tokens, small.max_input_tokens) == (512, 511)
    assert small.max_batch_prefill_tokens == DEFAULT_MAX_BATCH_PREFILL_TOKENS
    assert small.max_batch_total_tokens is None  # not known before warm-up
    large = resolve_limits(config(), max_position_embeddings=131072)
    assert (large.max_total_tokens, large.max_input_tokens) == (
        DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_MAX_TOTAL_TOKENS - 1)
    # A longer prompt limit than the default total raises the total to fit it.
    long_input = resolve_limits(config(max_input_tokens=5000), max_position_embeddings=8192)
    assert (long_input.max_input_tokens, long_input.max_total_tokens) == (5000, 5001)


def test_batch_limits_on_a_cpu_are_tgis() -> None:
    resolved = resolve_limits(config(), max_position_embeddings=512)
    assert (resolved.max_batch_prefill_tokens, resolved.max_batch_size,
            resolved.max_concurrent_requests) == (4096, None, 128)


@pytest.mark.parametrize("memory_gib, prefill", [(80, 8192), (141, 8192), (64, 8192), (24, 4096), (40, 4096)])
def test_batch_limits_on_a_gpu_follow_its_memory(memory_gib: int, prefill: int) -> None:
    resolved = resolve_limits(config(), max_position_embeddings=131072, device_type="cuda",
                              device_memory_bytes=memory_gib * GIB)
    assert (resolved.max_batch_prefill_tokens, resolved.max_batch_size,
            resolved.max_concurrent_requests) == (prefill, 256, 512)


def test_given_batch_limits_win_over_the_gpus_defaults() -> None:
    def on_h100(**fields: object) -> RouterConfig:
        return resolve_limits(config(**fields), max_position_embeddings=8192, device_type="cuda",
                              device_memory_bytes=80 * GIB)

    given = on_h100(max_batch_prefill_tokens=2048, max_batch_size=32, max_concurrent_requests=40)
    assert (given.max_batch_prefill_tokens, given.max_batch_size, given.max_concurrent_requests) == (
        2048, 32, 40)
    # The queue is twice the batch the user gave (at least TGI's 128)...
    assert on_h100(max_batch_size=512).max_concurrent_requests == 1024
    assert on_h100(max_batch_size=16).max_concurrent_requests == 128
    # ... and a smaller queue bounds the default batch: a step never holds more.
    assert on_h100(max_concurrent_requests=64).max_batch_size == 64
    assert device_defaults("cuda", 80 * GIB, max_batch_size=300).max_concurrent_requests == 600


def test_a_gpu_serves_the_models_whole_context_as_far_as_the_kv_cache_holds_it() -> None:
    def on_gpu(capacity: int | None, **fields: object) -> RouterConfig:
        return resolve_limits(config(**fields), max_position_embeddings=131072, device_type="cuda",
                              device_memory_bytes=80 * GIB, kv_capacity_tokens=capacity)

    # Before warm-up the model's limit (the shards may shrink it), after it what fits.
    assert (on_gpu(None).max_total_tokens, on_gpu(None).max_input_tokens) == (131072, 131071)
    assert (on_gpu(431312).max_total_tokens, on_gpu(431312).max_input_tokens) == (131072, 131071)
    assert (on_gpu(50000).max_total_tokens, on_gpu(50000).max_input_tokens) == (50000, 49999)
    assert on_gpu(431312, max_batch_total_tokens=60000).max_total_tokens == 60000
    assert on_gpu(431312, max_input_tokens=1000).max_total_tokens == 131072
    assert on_gpu(431312, max_total_tokens=8192).max_total_tokens == 8192
    # A prompt limit past what the cache holds is refused, naming both.
    with pytest.raises(ConfigError, match=r"holds 50000 tokens.*\(70001\)"):
        on_gpu(50000, max_input_tokens=70000)


def test_max_batch_total_tokens_defaults_to_the_kv_capacity() -> None:
    resolved = resolve_limits(config(), max_position_embeddings=512, kv_capacity_tokens=8000)
    assert resolved.max_batch_total_tokens == 8000 and resolved.limits_resolved()
    given = resolve_limits(config(max_batch_total_tokens=600), max_position_embeddings=512,
                           kv_capacity_tokens=8000)
    assert given.max_batch_total_tokens == 600


@pytest.mark.parametrize("fields, position, capacity, words", [
    ({"max_total_tokens": 1024}, 512, None, ["1024", "512", "max_position_embeddings"]),
    ({"max_input_tokens": 600}, 512, None, ["600", "512", "--max-input-tokens"]),
    ({}, 512, 300, ["300", "512", "KV cache"]),
    ({"max_batch_total_tokens": 9000}, 512, 8000, ["9000", "8000"]),
    ({"max_batch_total_tokens": 100}, 512, None, ["100", "512", "--max-total-tokens"]),
])
def test_limits_that_cannot_work_are_refused(fields: dict[str, object], position: int,
                                             capacity: int | None, words: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_limits(config(**fields), max_position_embeddings=position,
                       kv_capacity_tokens=capacity)
    for word in words:
        assert word in str(error.value), str(error.value)
