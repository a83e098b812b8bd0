"""fp8 weights (`--quantize fp8`): the projections in float8 e4m3, computed on fp8 tensor cores.

What a quantized linear computes (the contract the Triton kernels match):

    weight  W [N, K] -> Wq = saturate(W * (448 / a_n)) in e4m3, s_n = a_n / 448, once at load,
            a_n = max over k of |W[n, k]| (per output channel)
    input   x [M, K] -> xq = saturate(x * (448 / b_m)) in e4m3, t_m = b_m / 448, at every call,
            b_m = max over k of |x[m, k]| (per token, "dynamic")
    output  y [m, n] = t_m * s_n * sum over k of xq[m, k] * Wq[n, k]  (+ bias[n])

The sum runs on fp8 tensor cores, through torch._scaled_mm with row-wise scales (cuBLASLt on
CUDA) or, for a decode step's few rows on CUDA, the Triton small-batch kernel's fp8 variant
(shard/kernels/linear.py), so an 8,192-token prefill's GEMMs take ~1.8x less time than in bf16 and a decode step
reads half the weight bytes (benchmark/NOTES.md). Scales are fp32; a row whose largest
magnitude is 0 gets the floor MIN_AMAX, so its scale stays finite and its values stay 0.
This is what vLLM's `--quantization fp8` does with a bf16 checkpoint (per-channel weight
scales, per-token activation scales).

Checkpoints stored in fp8 load as they are (`fp8_checkpoint_strategy`): llm-compressor's
compressed-tensors format with e4m3 weights and a scale per output channel (FP8_DYNAMIC) or
per tensor (FP8, whose one scale becomes every row's). Their inputs are quantized per token
as above; a checkpoint's static input scales (`input_scale`) are not read.

The products are exact in fp32 on both paths; the sums differ in order (and, on CUDA,
accumulate with Hopper's fast fp8 accumulation), so the torch reference and the GPU agree to
~1e-3 relative, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# A row of zeros still gets a positive scale (its quantized values are all 0).
MIN_AMAX = 1e-12
# cuBLASLt's fp8 GEMM needs both dimensions of the weight to be multiples of 16.
FP8_CUDA_ALIGNMENT = 16


# A checkpoint's weight_scale: one per output channel ([N, 1]) or one per tensor.
FP8_CHECKPOINT_STRATEGIES = ("channel", "tensor")


def fp8_checkpoint_strategy(quantization_config: Mapping[str, Any] | None) -> str | None:
    """How the projections of a checkpoint stored in fp8 are scaled: "channel" or "tensor";
    None for a checkpoint without config.json's `quantization_config`.

    Reads compressed-tensors float8 schemes: one config group over the Linear layers,
    symmetric 8-bit float weights scaled per channel or per tensor, 8-bit float inputs
    (dynamic per token, or static per tensor: computed per token here), and nothing but
    the LM head left unquantized. ValueError names what else a checkpoint asks for.
    """
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"the checkpoint's quant_method {method!r} is not supported: shardgen reads "
                         f"compressed-tensors fp8 checkpoints, or quantizes a bf16 one with --quantize fp8")
    groups = list((quantization_config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"a compressed-tensors checkpoint with {len(groups)} config groups is not "
                         f"supported: shardgen reads one group of fp8 Linear layers")
    group = groups[0]
    weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
    strategy = weights.get("strategy")
    if not (_is_fp8_scheme(weights) and strategy in FP8_CHECKPOINT_STRATEGIES
            and weights.get("symmetric", True) and not weights.get("dynamic", False)):
        raise ValueError(f"compressed-tensors weights {dict(weights)} are not supported: shardgen reads "
                         f"8-bit float weights, symmetric, scaled per {' or per '.join(FP8_CHECKPOINT_STRATEGIES)}")
    if not _is_fp8_scheme(inputs):
        raise ValueError(f"compressed-tensors input_activations {dict(inputs) or None} are not supported: "
                         f"shardgen computes fp8 projections on 8-bit float inputs")
    targets = group.get("targets") or []
    if list(targets) != ["Linear"]:
        raise ValueError(f"compressed-tensors targets {targets} are not supported: shardgen reads "
                         f"checkpoints whose quantized layers are all the Linear ones")
    ignored = [name for name in quantization_config.get("ignore") or [] if name != "lm_head"]
    if ignored:
        raise ValueError(f"compressed-tensors checkpoints that leave {ignored} unquantized are not "
                         f"supported: shardgen reads those whose every projection is fp8 (and lm_head not)")
    return str(strategy)


def _is_fp8_scheme(scheme: Mapping[str, Any]) -> bool:
    return scheme.get("type") == "float" and scheme.get("num_bits") == 8


class Fp8Rows(NamedTuple):
    """Rows quantized per token: x ~= values * scale (a quantized projection takes these)."""

    values: torch.Tensor   # [M, K] e4m3
    scale: torch.Tensor    # [M, 1] fp32


def quantize_rows_fp8(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] -> (xq [M, K] e4m3, scale [M, 1] fp32) with x ~= xq * scale, per row (torch reference)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX)
    # Tensors over tensors: correctly rounded divisions, as the kernel's, on every device (a
    # number over a tensor, or on CUDA a tensor over a number, is computed by torch as
    # reciprocal-then-multiply: two roundings, an ulp off at times).
    fp8_max = amax.new_full((), FP8_MAX)
    inverse = fp8_max / amax
    quantized = (x.float() * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Rows(quantized, amax / fp8_max)


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (Wq [N, K] e4m3, scale [1, N] fp32), one scale per output channel."""
    quantized, scale = quantize_rows_fp8(weight)
    return quantized, scale.reshape(1, -1).contiguous()


def fp8_linear(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """(xq * x_scale) @ (Wq * weight_scale)^T (+ bias) in out_dtype, summed on fp8 tensor cores.

    x_q [M, K] and weight [N, K] are e4m3, x_scale [M, 1] and weight_scale [1, N] fp32.
    """
    return torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype,
        use_fast_accum=x_q.is_cuda,
    )
