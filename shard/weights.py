"""Reading a safetensors checkpoint into a (tensor-parallel) model, one slice per rank.

The checkpoint is never materialised whole: every tensor is handed to its parameter's
`weight_loader` as a lazy `TensorSlice`, and the loader (which lives next to the layer's
shape math in shard/layers) reads only the rows or columns this rank keeps.

A model declares how checkpoint names map onto its parameters as data:
  packed_modules_mapping  {checkpoint module: (fused parameter module, shard id)},
                          e.g. "q_proj": ("qkv_proj", "q"), "gate_proj": ("gate_up_proj", 0)
  skipped_weight_patterns substrings of checkpoint names that carry nothing to load
                          (e.g. rotary inv_freq buffers that old exports include)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


class TensorSlice(Protocol):
    """A tensor that is read only when indexed (safetensors' `get_slice` object)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


class TensorAsSlice:
    """Adapts an in-memory tensor to `TensorSlice` (tests, converted checkpoints)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self._tensor.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._tensor[index]


def check_shape(loaded: TensorSlice, expected: Sequence[int]) -> None:
    """Raises ValueError unless the checkpoint tensor has exactly the `expected` shape."""
    shape = loaded.get_shape()
    if list(shape) != list(expected):
        raise ValueError(f"checkpoint tensor has shape {list(shape)}, the model expects {list(expected)}")


def default_weight_loader(param: torch.nn.Parameter, loaded: TensorSlice) -> None:
    """Copies a whole (replicated) tensor into `param`, converting dtype and device."""
    check_shape(loaded, param.shape)
    param.data.copy_(loaded[:])


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The safetensors files that hold the model's weights.

    The index file (sharded checkpoints) decides when present; otherwise model.safetensors;
    otherwise every *.safetensors in the folder. Preferring the HF names keeps us off the
    duplicate `consolidated.safetensors` that some Mistral repositories ship beside them.
    """
    folder = Path(model_path)
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / _SINGLE_FILE).is_file():
        return [folder / _SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def iter_checkpoint(model_path: str | Path) -> Iterator[tuple[str, TensorSlice]]:
    """Yields (name, lazy slice) for every tensor of the checkpoint, file by file."""
    for file in checkpoint_files(model_path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_slice(name)


def load_weights(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, TensorSlice]],
    *,
    packed_modules_mapping: Mapping[str, tuple[str, str | int]],
    skipped_weight_patterns: Sequence[str] = (),
) -> None:
    """Loads every checkpoint tensor into its parameter; fails on any mismatch.

    Raises ValueError naming the tensor for an unknown checkpoint name or a bad shape,
    and naming the parameters the checkpoint left (partly) unfilled.
    """
    params = dict(model.named_parameters())
    loads = {name: 0 for name in params}
    for name, loaded in tensors:
        if any(pattern in name for pattern in skipped_weight_patterns):
            continue
        param_name, shard_id = _resolve(name, packed_modules_mapping)
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        param = params[param_name]
        loader = getattr(param, "weight_loader", None)
        try:
            if shard_id is None:
                (loader or default_weight_loader)(param, loaded)
            elif loader is None:
                raise ValueError(f"parameter {param_name!r} has no loader for packed shard {shard_id!r}")
            else:
                loader(param, loaded, shard_id)
        except ValueError as error:
            raise ValueError(f"loading {name!r} into {param_name!r}: {error}") from error
        loads[param_name] += 1
    _check_complete(loads, packed_modules_mapping)


def _resolve(name: str, mapping: Mapping[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    """Maps a checkpoint name to (parameter name, shard id or None for an unpacked tensor)."""
    for source, (target, shard_id) in mapping.items():
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{target}."), shard_id
    return name, None


def _check_complete(loads: Mapping[str, int], mapping: Mapping[str, tuple[str, str | int]]) -> None:
    missing = []
    for name, count in loads.items():
        # A fused parameter expects one load per checkpoint tensor packed into it.
        expected = sum(1 for target, _ in mapping.values() if f".{target}." in f".{name}") or 1
        if count != expected:
            missing.append(f"{name} ({count} of {expected} parts)")
    if missing:
        raise ValueError(f"checkpoint left parameters unfilled: {', '.join(missing)}")
