"""The launcher's flags: defaults, validation, and forwarding to the router and shards."""

import pytest

from shardgen.launcher.config import parse_args


def test_defaults_forward_nothing() -> None:
    config = parse_args([])
    assert config.model_id is None
    assert config.port == 3000
    assert config.router_args == ()
    assert config.shard_args == ()


def test_set_flags_are_forwarded_to_the_process_that_uses_them() -> None:
    config = parse_args(["--model-id", "/m", "--max-batch-size", "8", "--disable-prefix-caching",
                         "--num-blocks", "64", "--waiting-served-ratio", "0.5", "--kv-cache-dtype", "fp8",
                         "--quantize", "fp8", "--otlp-endpoint", "http://127.0.0.1:4318/v1/traces"])
    assert config.router_args == ("--max-batch-size", "8", "--waiting-served-ratio", "0.5",
                                  "--disable-prefix-caching",
                                  "--otlp-endpoint", "http://127.0.0.1:4318/v1/traces")
    assert config.shard_args == ("--num-blocks", "64", "--kv-cache-dtype", "fp8", "--quantize", "fp8",
                                 "--otlp-endpoint", "http://127.0.0.1:4318/v1/traces")


def test_num_shard_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--num-shard", "0"])
    assert "--num-shard must be at least 1, got 0" in capsys.readouterr().err
