"""The shard's kernel flags: --kernel-backend and --cuda-graphs resolve once, at parse time."""

from __future__ import annotations

import pytest

from shardgen.shard.config import ConfigError, parse_config

BASE = ["--model-id", "/models/m", "--uds-path", "/tmp/sg"]


def test_cuda_defaults_to_triton_with_graphs() -> None:
    config = parse_config(BASE, {}, cuda_available=True)
    assert (config.kernel_backend, config.cuda_graphs, config.cuda_graph_max_batch_size) == (
        "triton", True, 256)


def test_cpu_defaults_to_torch_without_graphs() -> None:
    config = parse_config(BASE, {}, cuda_available=False)
    assert (config.kernel_backend, config.cuda_graphs) == ("torch", False)


def test_the_torch_path_on_cuda_runs_eagerly() -> None:
    config = parse_config(BASE + ["--kernel-backend", "torch"], {}, cuda_available=True)
    assert (config.kernel_backend, config.cuda_graphs) == ("torch", False)


def test_several_ranks_capture_too_unless_told_not_to() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2"}
    assert parse_config(BASE, env, cuda_available=True).cuda_graphs
    assert not parse_config(BASE + ["--no-cuda-graphs"], env, cuda_available=True).cuda_graphs
    assert not parse_config(BASE + ["--no-cuda-graphs"], {}, cuda_available=True).cuda_graphs


@pytest.mark.parametrize("flags, cuda, message", [
    (["--cuda-graphs"], False, "needs --device cuda and --kernel-backend triton, got device cpu"),
    (["--cuda-graphs", "--kernel-backend", "torch"], True, "kernel backend torch"),
    (["--cuda-graph-max-batch-size", "0"], True, "must be at least 1, got 0"),
])
def test_impossible_graph_settings_name_the_value(flags: list[str], cuda: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + flags, {}, cuda_available=cuda)
