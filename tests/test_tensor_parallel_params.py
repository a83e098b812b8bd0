"""Each rank holds 1/N of the sharded weights plus the replicated ones, and nothing more.

Structural, on the meta device (nothing is allocated, no process group is needed to build
a rank's model): the expected counts are derived here from the config alone, and the
single-rank count must equal transformers' own model of the same config.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.models import get_model_class

_LLAMA, _QWEN2 = ["LlamaForCausalLM"], ["Qwen2ForCausalLM"]
_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64)
CONFIGS = {
    # The benchmark's shape (benchmark/tp_memory.py): 16 heads, 4 KV heads, even vocabulary.
    "bench": lambda: LlamaConfig(architectures=_LLAMA, hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                 vocab_size=32000),
    # Uneven vocabulary, KV heads replicated at 4 ranks, every bias (o and MLP biases replicated).
    "llama-biases": lambda: LlamaConfig(architectures=_LLAMA, **_SMALL, num_attention_heads=8,
                                        num_key_value_heads=2, vocab_size=509, attention_bias=True,
                                        mlp_bias=True),
    # Tied embedding, one KV head (replicated on every rank), q/k/v biases only.
    "qwen2-tied": lambda: Qwen2Config(architectures=_QWEN2, **_SMALL, num_attention_heads=4,
                                      num_key_value_heads=1, vocab_size=509, tie_word_embeddings=True),
}


def rank_model_params(config: PretrainedConfig, rank: int, world_size: int) -> int:
    """Parameters of one rank's model (a tied weight counted once)."""
    with torch.device("meta"):
        model = get_model_class(config.architectures[0])(config, TensorParallelGroup(rank, world_size))
    return sum(p.numel() for p in model.parameters())


def transformers_params(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def expected_rank_params(config: PretrainedConfig, world_size: int) -> int:
    """One rank's parameters: 1/N of every split tensor (more where the vocabulary split pads
    or KV heads are replicated), plus the whole norms and the biases added after a reduce."""
    n, h, i, v = world_size, config.hidden_size, config.intermediate_size, config.vocab_size
    d = h // config.num_attention_heads
    q_heads = config.num_attention_heads // n
    kv_heads = max(config.num_key_value_heads // n, 1)  # fewer KV heads than ranks: one copy each
    # Qwen2 has q/k/v biases and no other; Llama has them where its config says.
    qwen2 = config.model_type == "qwen2"
    qkv_bias = int(qwen2 or config.attention_bias)
    o_bias = int(not qwen2 and config.attention_bias)
    mlp_bias = int(getattr(config, "mlp_bias", False))

    vocab_rows = -(-v // n)  # the last rank's rows past the vocabulary are zero padding
    embeddings = vocab_rows * h * (1 if config.tie_word_embeddings else 2)
    qkv = (q_heads + 2 * kv_heads) * d * (h + qkv_bias)
    o = h * q_heads * d + o_bias * h          # input split; the bias is whole on every rank
    mlp = 3 * h * (i // n) + mlp_bias * (2 * (i // n) + h)
    norms = 2 * h
    return embeddings + config.num_hidden_layers * (qkv + o + mlp + norms) + h


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_rank_holds_what_transformers_holds(name: str) -> None:
    config = CONFIGS[name]()
    assert rank_model_params(config, 0, 1) == transformers_params(config)
    assert expected_rank_params(config, 1) == transformers_params(config)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_rank_holds_its_share(name: str, world_size: int) -> None:
    config = CONFIGS[name]()
    expected = expected_rank_params(config, world_size)
    assert [rank_model_params(config, r, world_size) for r in range(world_size)] == [expected] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_benchmark_shape_splits_to_one_nth_plus_the_norms(world_size: int) -> None:
    config = CONFIGS["bench"]()
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    total = transformers_params(config)
    assert rank_model_params(config, 0, world_size) == (total - norms) // world_size + norms
