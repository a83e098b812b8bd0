"""What each rank loads: slices that recompose to the checkpoint, read without the rest.

No processes are needed: a rank's model is built and loaded, never run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_harness import save_random_model
from transformers import LlamaConfig, PreTrainedModel

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.models import CausalLM, load_model
from shardgen.shard.models.llama import LlamaForCausalLM
from shardgen.shard.weights import TensorAsSlice

CONFIG = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=509, max_position_embeddings=32, attention_bias=True,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    path = tmp_path_factory.mktemp("tp")
    return path, save_random_model(path, LlamaConfig(**CONFIG))


def _ranks(path: Path, world_size: int) -> list[CausalLM]:
    return [load_model(path, dtype=torch.float32, device=torch.device("cpu"), rank=r, world_size=world_size)
            for r in range(world_size)]


def _split_qkv(model: CausalLM, layer: int, name: str) -> list[torch.Tensor]:
    proj = model.model.layers[layer].self_attn.qkv_proj
    return list(getattr(proj, name).split([proj.q_size, proj.kv_size, proj.kv_size]))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_recompose_to_the_checkpoint(checkpoint, world_size: int) -> None:
    path, reference = checkpoint
    full = reference.state_dict()
    ranks = _ranks(path, world_size)
    vocab = CONFIG["vocab_size"]
    for key, module in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "head")):
        stacked = torch.cat([m.model.embed_tokens.weight if module == "embed" else m.lm_head.weight for m in ranks])
        assert torch.equal(stacked[:vocab], full[key])
        assert not stacked[vocab:].any(), "padding rows of an uneven vocabulary must be zero"
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for part in ("weight", "bias"):
            pieces = [_split_qkv(m, layer, part) for m in ranks]
            assert torch.equal(torch.cat([p[0] for p in pieces]), full[prefix + f"self_attn.q_proj.{part}"])
            for index, name in ((1, "k_proj"), (2, "v_proj")):
                _check_kv(full[prefix + f"self_attn.{name}.{part}"], [p[index] for p in pieces], world_size)
        attn = [m.model.layers[layer].self_attn for m in ranks]
        assert torch.equal(torch.cat([a.o_proj.weight for a in attn], dim=1), full[prefix + "self_attn.o_proj.weight"])
        assert all(torch.equal(a.o_proj.bias, full[prefix + "self_attn.o_proj.bias"]) for a in attn)
        mlp = [m.model.layers[layer].mlp for m in ranks]
        gates, ups = zip(*(m.gate_up_proj.weight.chunk(2) for m in mlp))
        assert torch.equal(torch.cat(gates), full[prefix + "mlp.gate_proj.weight"])
        assert torch.equal(torch.cat(ups), full[prefix + "mlp.up_proj.weight"])
        assert torch.equal(torch.cat([m.down_proj.weight for m in mlp], dim=1), full[prefix + "mlp.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert all(torch.equal(getattr(m.model.layers[layer], norm).weight, full[prefix + f"{norm}.weight"])
                       for m in ranks)


def _check_kv(full: torch.Tensor, pieces: list[torch.Tensor], world_size: int) -> None:
    heads = CONFIG["num_key_value_heads"]
    if heads >= world_size:
        assert torch.equal(torch.cat(pieces), full)
        return
    # Fewer KV heads than ranks: each rank holds the one head its query heads use.
    per_head = full.shape[0] // heads
    q_heads_per_rank = CONFIG["num_attention_heads"] // world_size
    group = CONFIG["num_attention_heads"] // heads
    for rank, piece in enumerate(pieces):
        head = rank * q_heads_per_rank // group
        assert torch.equal(piece, full[head * per_head:(head + 1) * per_head])


class _RecordingSlice(TensorAsSlice):
    def __init__(self, tensor: torch.Tensor, reads: dict[str, int], name: str) -> None:
        super().__init__(tensor)
        self._reads, self._name = reads, name

    def __getitem__(self, index: object) -> torch.Tensor:
        out = super().__getitem__(index)
        self._reads[self._name] = self._reads.get(self._name, 0) + out.numel()
        return out


def test_a_rank_reads_only_its_share(checkpoint) -> None:
    _, reference = checkpoint
    world_size, rank = 4, 3
    model = LlamaForCausalLM(reference.config, TensorParallelGroup(rank, world_size))
    reads: dict[str, int] = {}
    model.load_weights((name, _RecordingSlice(t, reads, name)) for name, t in reference.state_dict().items())
    full = reference.state_dict()
    for name, tensor in full.items():
        if "norm" in name or "o_proj.bias" in name:
            expected = tensor.numel()  # replicated
        elif "k_proj" in name or "v_proj" in name:
            expected = tensor.numel() // CONFIG["num_key_value_heads"]  # one replicated head
        elif "embed_tokens" in name or "lm_head" in name:
            expected = (CONFIG["vocab_size"] - 3 * 128) * CONFIG["hidden_size"]  # the short last share
        else:
            expected = tensor.numel() // world_size
        assert reads[name] == expected, name


@pytest.mark.parametrize("heads, kv_heads, world_size", [(8, 2, 3), (6, 3, 2), (8, 8, 16)])
def test_heads_that_do_not_split_are_refused(tmp_path: Path, heads: int, kv_heads: int, world_size: int) -> None:
    config = LlamaConfig(**{**CONFIG, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                            "hidden_size": 8 * heads, "intermediate_size": 48})
    save_random_model(tmp_path, config)
    message = f"num_attention_heads={heads}, num_key_value_heads={kv_heads} over {world_size}"
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), rank=0, world_size=world_size)


def test_intermediate_size_that_does_not_split_is_refused(tmp_path: Path) -> None:
    save_random_model(tmp_path, LlamaConfig(**{**CONFIG, "intermediate_size": 90}))
    with pytest.raises(ValueError, match=r"output size \(90\) is not divisible by the tensor-parallel size \(4\)"):
        load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), rank=1, world_size=4)
