#!/usr/bin/env python3
"""Write a Llama-shaped checkpoint with random weights, for benchmarks on a GPU machine.

  python benchmark/make_random_model.py --shape llama-3.1-8b --tokenizer ../shared/tokenizers/llama3 \
      --out /tmp/llama8b

Weights are drawn on the GPU when there is one (an 8B model takes seconds), scaled so that
activations stay finite, and saved as bfloat16 safetensors in 5 GB files with an index.
With --fp8 the projections are stored as llm-compressor's FP8_DYNAMIC scheme stores them
(compressed-tensors: e4m3 weights with a float32 weight_scale per output channel), each
quantized from the bf16 weight the same seed draws, as `--quantize fp8` quantizes it at load.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardgen.shard.layers.quant import quantize_weight_fp8

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=128256),
}
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_FILE_BYTES = 5 * 1024**3
# config.json's quantization_config under --fp8 (compressed-tensors, FP8_DYNAMIC).
_FP8_DYNAMIC = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                              "strategy": "token"},
    }},
}


def config_for(shape: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape],
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA31_ROPE, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    }


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                   f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                   f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                   f"{p}.mlp.down_proj.weight": (h, i), f"{p}.input_layernorm.weight": (h,),
                   f"{p}.post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true", help="store the projections in fp8 (compressed-tensors)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cfg = config_for(args.shape)
    if args.fp8:
        cfg["quantization_config"] = _FP8_DYNAMIC
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}) + "\n")
    for item in args.tokenizer.iterdir():
        if item.is_file():
            shutil.copy(item, args.out / item.name)

    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, files = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file({k: t.cpu() for k, t in pending.items()}, str(args.out / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in pending})
        pending, pending_bytes = {}, 0

    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            std = shape[1] ** -0.5  # keeps each layer's output at unit scale
            tensor = (torch.randn(shape, generator=generator, device=device) * std).to(torch.bfloat16)
        if args.fp8 and name.endswith("_proj.weight"):
            tensor, scale = quantize_weight_fp8(tensor)
            pending[name.replace(".weight", ".weight_scale")] = scale.reshape(-1, 1)
        pending[name] = tensor
        pending_bytes += tensor.numel() * tensor.element_size()
        if pending_bytes >= _FILE_BYTES:
            flush()
    if pending:
        flush()
    index = {"metadata": {"total_size": sum(
        (args.out / f).stat().st_size for f in set(weight_map.values()))}, "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {args.shape} ({len(weight_map)} tensors, {files} files) to {args.out}")


if __name__ == "__main__":
    main()
