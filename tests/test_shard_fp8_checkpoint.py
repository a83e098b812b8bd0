"""Checkpoints stored in fp8 (compressed-tensors, shard/layers/quant.py): the projections load
as stored, e4m3 with their weight scales, each rank keeping the scales of its rows.

A checkpoint written from stories260K with the contract's own per-channel quantizer must give
the model that `--quantize fp8` makes of stories260K at load: the same bytes in every
parameter, hence, through the real shard and gRPC, the same greedy tokens and
log-probabilities. A per-tensor checkpoint gives each row its tensor's one scale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shard_rpc import STORIES, MiniRouter, running_shard
from test_model_harness import save_random_model
from transformers import LlamaConfig
from shardgen.proto import generate_pb2
from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.linear import ColumnParallelLinear, ParallelLinear, fp8_checkpoint_projections
from shardgen.shard.layers.quant import FP8_DTYPE, fp8_checkpoint_strategy, quantize_rows_fp8, quantize_weight_fp8
from shardgen.shard.models import load_model

CPU = torch.device("cpu")
PROMPTS = [[1, 403, 407, 261, 378], [1, 79, 1040 % 512, 263, 17, 300], [1, 3, 4, 5]]


def fp8_config(strategy: str, **changes: object) -> dict:
    """config.json's quantization_config as llm-compressor writes it for FP8_DYNAMIC
    (strategy "channel") or FP8 (strategy "tensor", static input scales)."""
    dynamic = strategy == "channel"
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
                              "strategy": "token" if dynamic else "tensor"},
    }
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": group}, "ignore": ["lm_head"]}
    config.update(changes)
    return config


def write_fp8_checkpoint(target: Path, strategy: str, source: Path = STORIES,
                         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`source` (stories260K) with every projection stored as compressed-tensors stores it:
    the weight (cast to `dtype` first, when given) in e4m3 and its weight_scale, [N, 1] per
    channel or [1] per tensor (with a static input_scale beside it, as FP8 checkpoints
    have). Returns the tensors written."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name in [name for name in tensors if name.endswith("_proj.weight")]:
        weight = tensors[name] if dtype is None else tensors[name].to(dtype)
        if strategy == "channel":
            quantized, scale = quantize_weight_fp8(weight)
            scale = scale.reshape(-1, 1)
        else:
            flat, scale = quantize_rows_fp8(weight.reshape(1, -1))
            quantized, scale = flat.reshape(weight.shape), scale.reshape(1)
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])
        tensors[name] = quantized
        tensors[name.replace(".weight", ".weight_scale")] = scale.contiguous()
    save_file(tensors, target / "model.safetensors")
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = fp8_config(strategy)
    (target / "config.json").write_text(json.dumps(config))
    return tensors


def projections(model: torch.nn.Module) -> dict[str, ParallelLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ParallelLinear)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_a_channel_checkpoint_loads_the_model_quantize_fp8_makes(tmp_path: Path) -> None:
    write_fp8_checkpoint(tmp_path / "fp8", "channel")
    stored = load_model(tmp_path / "fp8", dtype=torch.float32, device=CPU)
    quantized = load_model(STORIES, dtype=torch.float32, device=CPU, quantize="fp8")
    expected = dict(quantized.named_parameters())
    got = dict(stored.named_parameters())
    assert got.keys() == expected.keys()
    assert all(same_bytes(got[name].data, expected[name].data) for name in got)
    assert all(module.quantized and module.weight_scale.shape == (1, module.weight.shape[0])
               for module in projections(stored).values())


def test_layers_built_for_a_stored_fp8_checkpoint_hold_e4m3_from_the_start() -> None:
    """Not the model's dtype first: loading an fp8 checkpoint never needs its unquantized size."""
    tp = TensorParallelGroup(0, 1, None)
    with fp8_checkpoint_projections(quantize_rows_fp8):
        layer = ColumnParallelLinear(64, 32, False, tp)
    assert layer.quantized and layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (32, 1)
    assert ColumnParallelLinear(64, 32, False, tp).weight.dtype == torch.float32   # outside, as before


def test_a_tensor_checkpoint_gives_each_row_its_tensors_scale(tmp_path: Path) -> None:
    tensors = write_fp8_checkpoint(tmp_path / "fp8", "tensor")
    model = load_model(tmp_path / "fp8", dtype=torch.float32, device=CPU)
    layer = projections(model)["model.layers.1.self_attn.qkv_proj"]
    parts = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert same_bytes(layer.weight.data, torch.cat([tensors[f"{p}.weight"] for p in parts]))
    rows = [tensors[f"{p}.weight"].shape[0] for p in parts]
    want = torch.cat([tensors[f"{p}.weight_scale"].expand(n) for p, n in zip(parts, rows)])
    assert torch.equal(layer.weight_scale[0], want) and len(set(want.tolist())) == 3
    down = projections(model)["model.layers.1.mlp.down_proj"]
    assert torch.equal(down.weight_scale[0], tensors["model.layers.1.mlp.down_proj.weight_scale"].expand(64))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_each_rank_keeps_the_rows_and_scales_of_its_slice(tmp_path: Path, strategy: str) -> None:
    write_fp8_checkpoint(tmp_path / "fp8", strategy)
    whole = projections(load_model(tmp_path / "fp8", dtype=torch.float32, device=CPU))
    for rank in range(2):
        ranked = projections(load_model(tmp_path / "fp8", dtype=torch.float32, device=CPU, rank=rank,
                                        world_size=2))
        for name in ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.0.self_attn.o_proj"):
            full, part = whole[name], ranked[name]
            if name.endswith("gate_up_proj"):   # rank r: its rows of gate, then its rows of up
                half, local = full.weight.shape[0] // 2, part.weight.shape[0] // 2
                mine = range(rank * local, (rank + 1) * local)
                rows = [*mine, *(half + row for row in mine)]
                assert same_bytes(part.weight.data, full.weight.data[rows])
                assert torch.equal(part.weight_scale, full.weight_scale[:, rows])
            else:   # row-parallel: its columns of every row, and every row's scale
                cols = part.weight.shape[1]
                assert same_bytes(part.weight.data, full.weight.data[:, rank * cols:(rank + 1) * cols].contiguous())
                assert torch.equal(part.weight_scale, full.weight_scale)


def test_the_shard_generates_what_quantize_fp8_generates(tmp_path: Path) -> None:
    """Through the real shard and gRPC: greedy tokens and log-probabilities equal."""
    write_fp8_checkpoint(tmp_path / "fp8", "channel")
    warmup = generate_pb2.WarmupRequest(max_batch_prefill_tokens=64, max_batch_size=4, max_total_tokens=128)
    outputs = []
    for flags in (("--quantize", "fp8"), ("--model-id", str(tmp_path / "fp8"))):
        with running_shard("--num-blocks", "64", *flags) as shard:
            router = MiniRouter(shard.stub, shard.stub.Warmup(warmup).num_blocks)
            firsts = router.prefill(1, [router.request(i, p, max_new_tokens=24) for i, p in enumerate(PROMPTS)])
            router.run_to_completion()
            outputs.append(([list(g.tokens.logprobs) for g in firsts],
                            [router.sequences[i].generated for i in range(len(PROMPTS))]))
    assert outputs[0] == outputs[1]
    assert all(len(tokens) == 24 for tokens in outputs[0][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_stored_checkpoint_loads_the_bf16_model_quantize_fp8_makes(tmp_path: Path) -> None:
    """On CUDA (bf16, dimensions multiples of 16): the same bytes as `--quantize fp8`."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    save_random_model(tmp_path / "bf16", config)
    write_fp8_checkpoint(tmp_path / "fp8", "channel", tmp_path / "bf16", torch.bfloat16)
    cuda = torch.device("cuda", 0)
    stored = dict(load_model(tmp_path / "fp8", dtype=torch.bfloat16, device=cuda).named_parameters())
    quantized = dict(load_model(tmp_path / "bf16", dtype=torch.bfloat16, device=cuda,
                                quantize="fp8").named_parameters())
    assert stored.keys() == quantized.keys()
    assert all(same_bytes(stored[name].data, quantized[name].data) for name in stored)
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == FP8_DTYPE


def test_checkpoints_without_quantization_have_no_strategy() -> None:
    assert fp8_checkpoint_strategy(None) is None
    assert fp8_checkpoint_strategy({}) is None
    assert fp8_checkpoint_strategy(fp8_config("channel")) == "channel"
    assert fp8_checkpoint_strategy(fp8_config("tensor")) == "tensor"


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "quant_method 'fbgemm_fp8' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "quant_method 'fp8' is not supported"),
    (fp8_config("block"), "scaled per channel or per tensor"),
    (fp8_config("channel", ignore=["lm_head", "model.layers.0.mlp.down_proj"]),
     r"leave \['model.layers.0.mlp.down_proj'\] unquantized"),
    (fp8_config("channel", config_groups={}), "0 config groups"),
])
def test_other_quantizations_are_refused_by_name(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fp8_checkpoint_strategy(config)


def test_int8_weights_are_refused() -> None:
    config = fp8_config("channel")
    config["config_groups"]["group_0"]["weights"].update(type="int", num_bits=8)
    with pytest.raises(ValueError, match="8-bit float weights"):
        fp8_checkpoint_strategy(config)


def test_the_weights_are_stored_in_e4m3(tmp_path: Path) -> None:
    """The test's writer itself: what it stores is what compressed-tensors stores."""
    tensors = write_fp8_checkpoint(tmp_path / "fp8", "channel")
    weight, scale = tensors["model.layers.0.mlp.down_proj.weight"], tensors["model.layers.0.mlp.down_proj.weight_scale"]
    assert weight.dtype == FP8_DTYPE and scale.shape == (64, 1) and scale.dtype == torch.float32
