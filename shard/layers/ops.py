"""The hot-path ops of the model, chosen once per model: Triton kernels or torch.

    ops = select_ops("auto", torch.device("cuda", 0), head_dim=128)   # Triton on CUDA
    model = load_model(path, dtype=..., device=..., ops=ops)

Every layer that runs one of these ops takes an `Ops` when it is built and calls through
it, so the choice costs one attribute read per call, never a branch on the device.
Both sets share the signatures of shard/layers (the torch reference path), with one
difference that callers must respect: the Triton `rotary_and_write_kv` rotates q and k in
place (and returns them), the torch one returns new tensors; callers use the returned pair
and never the inputs afterwards.

The torch set reads step metadata on the host (`paged_attention` calls `.tolist()`), so
only the Triton set can run inside a CUDA graph (`graph_safe`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardgen.shard.layers import activation, attention, norm, quant, rotary

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    """One implementation of each hot-path op (see shard/layers for their contracts)."""

    name: str
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # apply_rotary, then write_kv of the rotated k and v: one launch in the Triton set.
    rotary_and_write_kv: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    # F.linear's contract, for the few rows of a decode step (layers/linear.py decides when).
    small_batch_linear: Callable[..., torch.Tensor]
    # quant.fp8_linear's contract, for the few rows of a decode step (--quantize fp8).
    small_batch_linear_fp8: Callable[..., torch.Tensor]
    # A projection's input [M, K] -> Fp8Rows (e4m3 [M, K], fp32 scales [M, 1]), per token
    # (--quantize fp8); and silu_and_mul with its output so quantized (down_proj's input).
    quantize_rows_fp8: Callable[[torch.Tensor], quant.Fp8Rows]
    silu_and_mul_fp8: Callable[[torch.Tensor], quant.Fp8Rows]
    # The norms with their normed rows so quantized (a quantized qkv_proj's or gate_up_proj's input).
    rms_norm_fp8: Callable[..., quant.Fp8Rows]
    fused_add_rms_norm_fp8: Callable[..., tuple[quant.Fp8Rows, torch.Tensor]]
    graph_safe: bool   # no op reads a device value on the host: a step can be captured


TORCH_OPS = Ops(
    name="torch",
    write_kv=attention.write_kv,
    paged_attention=attention.paged_attention,
    rms_norm=norm.rms_norm,
    fused_add_rms_norm=norm.fused_add_rms_norm,
    rotary_and_write_kv=rotary.rotary_and_write_kv,
    silu_and_mul=activation.silu_and_mul,
    small_batch_linear=F.linear,
    small_batch_linear_fp8=quant.fp8_linear,
    quantize_rows_fp8=quant.quantize_rows_fp8,
    silu_and_mul_fp8=activation.silu_and_mul_fp8,
    rms_norm_fp8=norm.rms_norm_fp8,
    fused_add_rms_norm_fp8=norm.fused_add_rms_norm_fp8,
    graph_safe=False,
)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels of shardgen.shard.kernels (imported on first use: they need Triton)."""
    from shardgen.shard.kernels import activation as k_activation
    from shardgen.shard.kernels import attention as k_attention
    from shardgen.shard.kernels import kv_cache as k_kv_cache
    from shardgen.shard.kernels import linear as k_linear
    from shardgen.shard.kernels import norm as k_norm
    from shardgen.shard.kernels import quant as k_quant
    from shardgen.shard.kernels import rotary as k_rotary

    return Ops(
        name="triton",
        write_kv=k_kv_cache.write_kv,
        paged_attention=k_attention.paged_attention,
        rms_norm=k_norm.rms_norm,
        fused_add_rms_norm=k_norm.fused_add_rms_norm,
        rotary_and_write_kv=k_rotary.rotary_and_write_kv,
        silu_and_mul=k_activation.silu_and_mul,
        small_batch_linear=k_linear.linear,
        small_batch_linear_fp8=k_linear.linear_fp8,
        quantize_rows_fp8=k_quant.quantize_rows_fp8,
        silu_and_mul_fp8=k_activation.silu_and_mul_fp8,
        rms_norm_fp8=k_norm.rms_norm_fp8,
        fused_add_rms_norm_fp8=k_norm.fused_add_rms_norm_fp8,
        graph_safe=True,
    )


def triton_supports(head_dim: int) -> bool:
    """Whether the Triton attention kernels take this head size (a power of two in [16, 256])."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_backend(backend: str, device_type: str) -> str:
    """"auto" -> "triton" on CUDA, "torch" elsewhere; a named backend stays as it is.

    "triton" off CUDA runs only inside Triton's interpreter (TRITON_INTERPRET=1, tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return backend


def select_ops(backend: str, device: torch.device, head_dim: int) -> Ops:
    """The ops of `backend` ("auto", "triton" or "torch") for a model on `device`.

    "auto" falls back to torch where the Triton attention cannot take `head_dim`; a
    "triton" that cannot is a ValueError naming the head size and the supported ones.
    """
    resolved = resolve_backend(backend, device.type)
    if resolved == "torch":
        return TORCH_OPS
    if not triton_supports(head_dim):
        if backend == "auto":
            return TORCH_OPS
        raise ValueError(f"the Triton kernels need a power-of-two head_dim in [16, 256], the model "
                         f"has {head_dim}: use --kernel-backend torch")
    return triton_ops()
