"""Checkpoint discovery and the loader's refusals: every tensor placed, every parameter filled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_model_harness import PagedDriver, save_random_model
from transformers import LlamaConfig

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.models import load_model
from shardgen.shard.models.llama import LlamaForCausalLM
from shardgen.shard.weights import TensorAsSlice, checkpoint_files

CONFIG = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=97, max_position_embeddings=32,
)


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, TensorAsSlice]]:
    return [(name, TensorAsSlice(t)) for name, t in state.items()]


def _fresh(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, TensorParallelGroup())


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    reference = save_random_model(tmp_path / "single", LlamaConfig(**CONFIG))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = checkpoint_files(tmp_path / "sharded")
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.arange(10) * 7
    results = []
    for name in ("single", "sharded"):
        model = load_model(tmp_path / name, dtype=torch.float32, device=torch.device("cpu"))
        results.extend(PagedDriver(model, [ids]).run([[(0, 10)]]))
    assert torch.equal(results[0], results[1])


def test_model_safetensors_is_preferred_over_stray_files(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_folder_without_safetensors_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        checkpoint_files(tmp_path)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))


def test_missing_part_of_a_fused_parameter_is_named(reference) -> None:
    state = {k: v for k, v in reference.state_dict().items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight \(2 of 3 parts\)"):
        _fresh(reference.config).load_weights(_tensors(state))


def test_unknown_tensor_is_named(reference) -> None:
    state = {**reference.state_dict(), "model.layers.0.mlp.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.extra\.weight' matches no parameter"):
        _fresh(reference.config).load_weights(_tensors(state))


def test_wrong_shape_names_tensor_and_shapes(reference) -> None:
    state = {**reference.state_dict(), "model.layers.0.mlp.down_proj.weight": torch.zeros(32, 40)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*\[32, 40\].*\[32, 48\]"):
        _fresh(reference.config).load_weights(_tensors(state))


def test_tied_embeddings_ignore_a_stored_lm_head_and_share_the_embedding(reference) -> None:
    config = LlamaConfig(**CONFIG, tie_word_embeddings=True)
    model = _fresh(config)
    state = {**reference.state_dict(), "lm_head.weight": torch.full((97, 32), 123.0)}
    model.load_weights(_tensors(state))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.state_dict()["model.embed_tokens.weight"])


def test_untied_model_needs_its_lm_head(reference) -> None:
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"lm_head\.weight \(0 of 1 parts\)"):
        _fresh(reference.config).load_weights(_tensors(state))


def test_old_rotary_buffers_are_skipped(reference) -> None:
    state = {**reference.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    model = _fresh(reference.config)
    model.load_weights(_tensors(state))
    assert torch.equal(model.model.norm.weight, reference.state_dict()["model.norm.weight"])
