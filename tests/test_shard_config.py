"""ShardConfig: flags and the distributed environment, parsed once and checked."""

from __future__ import annotations

import pytest

from shardgen.shard.config import ConfigError, parse_config

BASE = ["--model-id", "/models/m", "--uds-path", "/tmp/sg"]


def test_defaults_resolve_for_cpu() -> None:
    config = parse_config(BASE, {}, cuda_available=False)
    assert (config.device_type, config.dtype) == ("cpu", "float32")
    assert (config.block_size, config.kv_cache_bytes, config.num_blocks) == (16, 1 << 30, None)
    assert config.cuda_memory_fraction == 0.9 and config.distributed_timeout_s == 600.0
    assert (config.rank, config.world_size, config.master_addr, config.master_port) == (
        0, 1, "127.0.0.1", 29500)
    assert config.address == "unix:///tmp/sg-0"
    assert config.kv_cache_dtype == "auto"
    assert parse_config(BASE + ["--kv-cache-dtype", "fp8"], {}, cuda_available=False).kv_cache_dtype == "fp8"
    assert config.quantize is None
    assert parse_config(BASE + ["--quantize", "fp8"], {}, cuda_available=False).quantize == "fp8"


def test_auto_picks_cuda_and_bfloat16_when_a_gpu_is_there() -> None:
    config = parse_config(BASE, {}, cuda_available=True)
    assert (config.device_type, config.dtype) == ("cuda", "bfloat16")
    assert parse_config(BASE + ["--dtype", "float16"], {}, cuda_available=True).dtype == "float16"
    assert parse_config(BASE + ["--quantize", "fp8"], {}, cuda_available=True).quantize == "fp8"


def test_fp8_weights_on_cuda_need_bfloat16() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(BASE + ["--quantize", "fp8", "--dtype", "float16"], {}, cuda_available=True)
    assert "--quantize fp8 computes in bfloat16 on CUDA, got --dtype float16" in str(raised.value)


def test_environment_places_the_rank() -> None:
    env = {"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    config = parse_config(BASE + ["--num-blocks", "100", "--json-output"], env, cuda_available=False)
    assert (config.rank, config.world_size, config.master_addr, config.master_port) == (
        2, 4, "10.0.0.1", 1234)
    assert config.socket_path == "/tmp/sg-2"
    assert config.shard_addresses() == [f"unix:///tmp/sg-{r}" for r in range(4)]
    assert config.num_blocks == 100 and config.json_output


def test_the_launchers_tracing_flags_are_accepted() -> None:
    config = parse_config(BASE + ["--otlp-endpoint", "http://collector:4318",
                                  "--otlp-service-name", "svc"], {}, cuda_available=False)
    assert (config.otlp_endpoint, config.otlp_service_name) == ("http://collector:4318", "svc")


@pytest.mark.parametrize("flags, env, message", [
    (["--block-size", "0"], {}, "--block-size must be at least 1, got 0"),
    (["--num-blocks", "1"], {}, "--num-blocks must be at least 2"),
    (["--cuda-memory-fraction", "1.5"], {}, "must be in (0, 1], got 1.5"),
    (["--kv-cache-bytes", "0"], {}, "--kv-cache-bytes must be positive, got 0"),
    ([], {"RANK": "3", "WORLD_SIZE": "2"}, "RANK must be in [0, 2), got 3"),
    ([], {"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
    (["--device", "cuda"], {}, "--device cuda was asked for"),
])
def test_bad_values_name_the_value_and_the_limit(flags: list[str], env: dict[str, str],
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(BASE + flags, env, cuda_available=False)
    assert message in str(raised.value)
