"""Argument checks and launch helpers shared by the kernel modules.

Every public kernel entry point validates its arguments on the host before it launches
anything: a bad shape or dtype reaching a Triton kernel reads or writes out of bounds
instead of failing. The checks use tensor metadata only (never values), so they cost no
device synchronisation and stay legal inside CUDA-graph capture.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A KV cache holds the model's dtype, or fp8 e4m3 (stored unscaled, read back as q's dtype).
FP8_KV_DTYPE = torch.float8_e4m3fn
KV_CACHE_DTYPES = (*FLOAT_DTYPES, FP8_KV_DTYPE)


def require(condition: bool, message: str) -> None:
    """Raises ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


def check_float(name: str, tensor: torch.Tensor) -> None:
    """The kernels compute in fp16, bf16 or fp32 only."""
    require(
        tensor.dtype in FLOAT_DTYPES,
        f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}",
    )


def check_kv_cache_dtype(name: str, tensor: torch.Tensor) -> None:
    """A cache is fp16, bf16, fp32 or fp8 e4m3."""
    require(
        tensor.dtype in KV_CACHE_DTYPES,
        f"{name} must be float16, bfloat16, float32 or float8_e4m3fn, got {tensor.dtype}",
    )


def check_dims(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """tensor has exactly ndim dimensions; layout names them for the message, e.g. "[T, H]"."""
    require(tensor.dim() == ndim, f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Rows may be strided (views of a fused projection) but each row must be dense."""
    require(
        tensor.shape[-1] <= 1 or tensor.stride(-1) == 1,
        f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}",
    )


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    """The kernel computes offsets from the shape alone."""
    require(
        tensor.is_contiguous(),
        f"{name} must be contiguous, got strides {tensor.stride()} for shape {tuple(tensor.shape)}",
    )


def check_index_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Index tensors have one fixed integer dtype (the contract's)."""
    require(tensor.dtype == dtype, f"{name} must be {dtype}, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors of one launch live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    require(
        all(d == first for d in devices.values()),
        "all tensors must be on one device, got " + ", ".join(f"{n}={d}" for n, d in devices.items()),
    )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Read when called (Triton itself decides when a kernel module is imported, so the
    variable must be set before that); triton.knobs exists from Triton 3.4 on.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tile(name: str, value: int, minimum: int = 16) -> None:
    """Tile sizes are powers of two of at least tl.dot's minimum of 16."""
    require(is_power_of_2(value) and value >= minimum, f"{name} must be a power of two >= {minimum}, got {value}")


# Stand-in for the SM count when there is no GPU (the interpreter): small, so that the
# heuristics that depend on it still pick split-decode for small batches in tests.
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small stand-in off CUDA)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 models (tf32 would lose ~3 digits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# SHARDGEN_PDL=0 launches every kernel the plain way (for comparisons).
_PDL_ALLOWED = os.environ.get("SHARDGEN_PDL", "1") != "0"
# Triton has the griddepcontrol instructions and the launch_pdl option from 3.3 on.
_PDL_IN_TRITON = hasattr(tl.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: on Hopper or
    newer, with a Triton that has it (3.3 on), outside the interpreter, unless SHARDGEN_PDL=0."""
    if device.type != "cuda" or not _PDL_ALLOWED or not _PDL_IN_TRITON or interpreting():
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def dependent_launch_args(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel whose first statement is dependent_launch: its
    USE_PDL, and launch_pdl when on (a Triton without it knows no such option)."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(device) else {"USE_PDL": False}


@triton.jit
def dependent_launch(USE_PDL: tl.constexpr):
    """The first statement of a kernel launched with dependent_launch_args.

    Every program first waits until the kernel queued before has finished and its writes
    are visible (griddepcontrol.wait), then lets the next kernel's programs be scheduled;
    they wait here in turn. As every program waits before touching memory, any two
    kernels of the stream stay ordered as without it; what overlaps is the launch and
    scheduling of a kernel with the run of the one before (within a CUDA graph too).
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
