"""Model registry and loading: config.json's architecture picks the family.

    model = load_model(path, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                       rank=r, world_size=n, process_group=group, kernel_backend="auto",
                       quantize=None)   # or "fp8"
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.distributed import ProcessGroup
from transformers import AutoConfig, PretrainedConfig

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.linear import ParallelLinear, fp8_checkpoint_projections
from shardgen.shard.layers.ops import select_ops
from shardgen.shard.layers.quant import fp8_checkpoint_strategy
from shardgen.shard.config import QUANTIZE_CHOICES
from shardgen.shard.models.base import CausalLM
from shardgen.shard.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from shardgen.shard.weights import TensorSlice, iter_checkpoint

__all__ = ["CausalLM", "get_model_class", "load_model", "supported_architectures"]

logger = logging.getLogger(__name__)

# Keyed by the names in config.json's `architectures`.
_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(architecture: str) -> type[CausalLM]:
    """The class implementing `architecture`; ValueError naming it and the supported ones."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None


def load_model(
    model_path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    process_group: ProcessGroup | None = None,
    kernel_backend: str = "auto",
    quantize: str | None = None,
) -> CausalLM:
    """Builds the model of a local HF folder (config.json + *.safetensors) for one rank.

    Each rank reads only its slice of every tensor. With world_size > 1, process_group
    None means torch.distributed's default group (which must then be initialised before
    the first forward). `kernel_backend` ("auto", "triton", "torch"; see
    shard/layers/ops.py) picks the hot-path ops once, for every layer. Raises ValueError
    for an unsupported architecture, a model that cannot be split over world_size ranks,
    or a head size the Triton kernels cannot take when "triton" is asked for.
    `quantize` "fp8" turns every projection's weight into e4m3 once it is loaded (see
    shard/layers/quant.py); the embedding and the LM head keep `dtype`. A checkpoint stored
    in fp8 (config.json's quantization_config, fp8_checkpoint_strategy) loads its
    projections as stored, with or without `quantize`; ValueError for a quantization it
    does not read.
    """
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    config = AutoConfig.from_pretrained(model_path)
    fp8_strategy = fp8_checkpoint_strategy(getattr(config, "quantization_config", None))
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(
            f"{model_path}/config.json names no architecture; supported: {', '.join(supported_architectures())}"
        )
    model_class = get_model_class(architectures[0])
    tp = TensorParallelGroup(rank, world_size, process_group)
    ops = select_ops(kernel_backend, device, _head_dim(config))
    stored_fp8 = fp8_checkpoint_projections(ops.quantize_rows_fp8) if fp8_strategy else nullcontext()
    with _default_dtype(dtype), torch.device(device), stored_fp8:
        model = model_class(config, tp, ops)
    if fp8_strategy is None:
        model.load_weights(iter_checkpoint(model_path))
        if quantize is not None:
            _quantize_projections(model)
        return model.eval()
    projections = [module for module in model.modules() if isinstance(module, ParallelLinear)]
    model.load_weights(_without_input_scales(iter_checkpoint(model_path)))
    for module in projections:
        module.fp8_checkpoint_loaded()
    logger.info("%s is stored in fp8: %d projections loaded as e4m3 with a weight scale per %s; inputs "
                "quantized per token", model_path, len(projections), fp8_strategy)
    return model.eval()


def _without_input_scales(tensors: Iterable[tuple[str, TensorSlice]]) -> Iterator[tuple[str, TensorSlice]]:
    """A checkpoint's tensors but its static input scales: inputs are quantized per token here."""
    return ((name, tensor) for name, tensor in tensors if not name.endswith(".input_scale"))


def _quantize_projections(model: CausalLM) -> None:
    """Every tensor-parallel projection of `model` to fp8 (the one QUANTIZE_CHOICES), one at a
    time: the memory in use peaks at the unquantized model plus one projection's fp8 copy."""
    for module in model.modules():
        if isinstance(module, ParallelLinear):
            module.quantize_fp8(model.ops.quantize_rows_fp8)


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside get `dtype` (torch has no per-call override for modules)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
