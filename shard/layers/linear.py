"""Tensor-parallel linear layers, each with the loader that reads its rank's slice.

Named after what they shard (PyTorch weight layout [out, in]):
  ColumnParallelLinear        output features split over ranks; no collective
  MergedColumnParallelLinear  several column-parallel outputs fused (gate and up)
  QKVParallelLinear           q, k, v fused, split by heads; KV heads replicated when
                              there are fewer of them than ranks
  RowParallelLinear           input features split over ranks; all-reduce of the output

A column-parallel layer feeds a row-parallel one, so a block costs one all-reduce.

The matmul is F.linear (cuBLAS), except for decode-sized inputs on a model built with the
Triton ops: up to SMALL_BATCH_MAX_ROWS rows go to ops.small_batch_linear, a kernel that
streams W at memory speed where cuBLAS leaves bandwidth unused (shard/kernels/linear.py).
Whether a layer can use it is decided once, when it is built on its device (load_model
builds the model there); a call only compares its row count. The gain is on the device:
a Triton launch costs more host time than cuBLAS's (~50 vs ~15-23 us measured on the
H100 machine), so it pays inside CUDA graphs, less so in host-bound eager steps.

With `--quantize fp8` every layer's loaded weight is replaced by float8 e4m3 with one
scale per output row (quantize_fp8, after loading; shard/layers/quant.py): a call then
quantizes its input per token (unless it comes quantized) and multiplies on the fp8 tensor
cores: cuBLASLt's scaled GEMM, or for up to SMALL_BATCH_MAX_ROWS rows on CUDA the Triton
kernel's fp8 variant (ops.small_batch_linear_fp8), which streams the e4m3 weight nearer the
copy floor than cuBLASLt does at decode sizes. A checkpoint stored in fp8 gives the same
layer without a requantization: built inside fp8_checkpoint_projections, the layer holds an
e4m3 weight from the start, and the weight and its `weight_scale` load as stored, each rank
keeping the scales of its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.ops import TORCH_OPS, Ops
from shardgen.shard.layers.quant import FP8_CUDA_ALIGNMENT, FP8_DTYPE, Fp8Rows, fp8_linear, quantize_weight_fp8
from shardgen.shard.weights import TensorAsSlice, TensorSlice, check_shape, default_weight_loader

# Rows of x up to which ops.small_batch_linear replaces F.linear (a decode step's batch).
SMALL_BATCH_MAX_ROWS = 32
# The input quantizer of the layers built inside fp8_checkpoint_projections; None outside.
_STORED_FP8: ContextVar[Callable[[torch.Tensor], Fp8Rows] | None] = ContextVar("stored_fp8", default=None)
_SMALL_BATCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or ValueError naming `what` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def small_batch_linear_for(ops: Ops, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The linear a layer with weights of `dtype` on `device` runs for at most SMALL_BATCH_MAX_ROWS rows.

    ops.small_batch_linear on CUDA for the float dtypes its kernel takes; F.linear elsewhere
    (the torch ops, CPU, the interpreter), so the CPU path stays exactly F.linear.
    """
    if device.type == "cuda" and dtype in _SMALL_BATCH_DTYPES:
        return ops.small_batch_linear
    return F.linear


@contextmanager
def fp8_checkpoint_projections(quantize_input: Callable[[torch.Tensor], Fp8Rows]) -> Iterator[None]:
    """ParallelLinear layers built inside hold e4m3 weights from the start (hold_fp8_checkpoint,
    their inputs quantized by `quantize_input`): a model whose checkpoint stores its
    projections in fp8 never holds them all in its own dtype, at twice the bytes or more."""
    token = _STORED_FP8.set(quantize_input)
    try:
        yield
    finally:
        _STORED_FP8.reset(token)


class ParallelLinear(nn.Module):
    """Holds a [out_local, in_local] weight and optional [out_local] bias."""

    def __init__(self, in_local: int, out_local: int, bias: bool, tp: TensorParallelGroup, ops: Ops) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.bias = None
        self._small_batch_linear = small_batch_linear_for(ops, self.weight.device, self.weight.dtype)
        on_cuda = self.weight.device.type == "cuda"
        self._small_batch_linear_fp8 = ops.small_batch_linear_fp8 if on_cuda else fp8_linear
        # Set by quantize_fp8 (or hold_fp8_checkpoint): the weight's per-row scales
        # [1, out_local], the input quantizer and the output's dtype (the model's).
        self.weight_scale: nn.Parameter | None = None
        self._quantize_input: Callable[[torch.Tensor], Fp8Rows] | None = None
        self._out_dtype = self.weight.dtype
        stored_fp8 = _STORED_FP8.get()
        if stored_fp8 is not None:
            self.hold_fp8_checkpoint(stored_fp8)

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        raise NotImplementedError

    @property
    def quantized(self) -> bool:
        """Whether the weight is e4m3 (quantize_fp8, or a checkpoint stored in fp8): calls then
        also take inputs already quantized (Fp8Rows)."""
        return self._quantize_input is not None

    def quantize_fp8(self, quantize_input: Callable[[torch.Tensor], Fp8Rows]) -> None:
        """Replaces the loaded weight by e4m3 with per-output-row scales; calls then quantize
        their input with `quantize_input` (an Ops.quantize_rows_fp8) and multiply in fp8.

        On CUDA the weight's dimensions must be multiples of FP8_CUDA_ALIGNMENT and the model
        bf16 (cuBLASLt's row-wise scaled GEMM); a ValueError says which layer breaks that.
        """
        weight = self.weight.data
        self._check_fp8_weight(weight)
        quantized, scale = quantize_weight_fp8(weight)
        self._out_dtype = weight.dtype
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self._quantize_input = quantize_input

    def hold_fp8_checkpoint(self, quantize_input: Callable[[torch.Tensor], Fp8Rows]) -> None:
        """For a checkpoint stored in fp8 (called when built inside fp8_checkpoint_projections):
        the weight becomes an e4m3 tensor that loads as stored, and `weight_scale` a float32
        column [out_local, 1] that loads this rank's rows of the checkpoint's scales
        (_load_scale). fp8_checkpoint_loaded then lays the scales out as quantize_fp8 does.
        Same conditions as quantize_fp8."""
        weight = self.weight.data
        self._check_fp8_weight(weight)
        self._out_dtype = weight.dtype
        self.weight = nn.Parameter(torch.empty_like(weight, dtype=FP8_DTYPE), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        column = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        self.weight_scale = nn.Parameter(column, requires_grad=False)
        self.weight_scale.weight_loader = self._load_scale  # type: ignore[attr-defined]
        self._quantize_input = quantize_input

    def fp8_checkpoint_loaded(self) -> None:
        """The scales as the fp8 GEMMs take them: [1, out_local] (the loaded column's storage)."""
        assert self.weight_scale is not None, "hold_fp8_checkpoint comes first"
        self.weight_scale = nn.Parameter(self.weight_scale.data.view(1, -1), requires_grad=False)

    def _check_fp8_weight(self, weight: torch.Tensor) -> None:
        if weight.is_cuda:
            if weight.shape[0] % FP8_CUDA_ALIGNMENT or weight.shape[1] % FP8_CUDA_ALIGNMENT:
                raise ValueError(f"fp8 weights need dimensions that are multiples of {FP8_CUDA_ALIGNMENT} "
                                 f"on CUDA; this rank's {type(self).__name__} is {list(weight.shape)}")
            if weight.dtype != torch.bfloat16:
                raise ValueError(f"fp8 weights compute in bfloat16 on CUDA, the model is {weight.dtype}")

    def _load_scale(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        """A checkpoint's weight_scale into the [out_local, 1] column: one per output row
        ([N, 1] or [N]), or one for the whole tensor, which each of its rows takes."""
        scale = loaded[...].to(torch.float32).reshape(-1, 1)
        if scale.shape[0] == 1:
            scale = scale.expand(self.checkpoint_rows(*shard_id), 1)
        self._load_scale_rows(param, TensorAsSlice(scale), *shard_id)

    def checkpoint_rows(self, *shard_id: object) -> int:
        """Output rows of the checkpoint tensor that `shard_id` names (all ranks together)."""
        raise NotImplementedError

    def _load_scale_rows(self, param: nn.Parameter, scale: TensorSlice, *shard_id: object) -> None:
        """A scale per checkpoint row goes where that row of the weight goes."""
        self.weight_loader(param, scale, *shard_id)

    def matmul(self, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in_local] @ weight^T (+ bias): in fp8 once quantized (x as it comes, or already
        quantized), else by the small-batch linear for at most SMALL_BATCH_MAX_ROWS rows and
        F.linear above."""
        if self._quantize_input is not None:
            rows = x if isinstance(x, Fp8Rows) else self._quantize_input(x)
            fp8 = self._small_batch_linear_fp8 if rows.values.shape[0] <= SMALL_BATCH_MAX_ROWS else fp8_linear
            return fp8(rows.values, rows.scale, self.weight, self.weight_scale, bias, self._out_dtype)
        linear = self._small_batch_linear if x.shape[0] <= SMALL_BATCH_MAX_ROWS else F.linear
        return linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(ParallelLinear):
    """y[:, rank's columns] = x W_r^T: rank r keeps output rows [r*out/N, (r+1)*out/N)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp: TensorParallelGroup, ops: Ops = TORCH_OPS
    ) -> None:
        self.output_size_local = divide(output_size, tp.world_size, "output size")
        super().__init__(input_size, self.output_size_local, bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        size = self.output_size_local
        check_shape(loaded, [size * self.tp.world_size, *param.shape[1:]])
        param.data.copy_(loaded[self.tp.rank * size:(self.tp.rank + 1) * size])

    def checkpoint_rows(self, *shard_id: object) -> int:
        return self.output_size_local * self.tp.world_size


class MergedColumnParallelLinear(ParallelLinear):
    """Several column-parallel projections of one input in one matmul.

    Rank r's weight is [part_0 rows of rank r; part_1 rows of rank r; ...]; shard id i
    names the checkpoint tensor of part i (e.g. 0 = gate_proj, 1 = up_proj).
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, tp: TensorParallelGroup, ops: Ops = TORCH_OPS
    ) -> None:
        self.local_sizes = [divide(size, tp.world_size, "output size") for size in output_sizes]
        super().__init__(input_size, sum(self.local_sizes), bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        index = self._part(*shard_id)
        size = self.local_sizes[index]
        offset = sum(self.local_sizes[:index])
        check_shape(loaded, [size * self.tp.world_size, *param.shape[1:]])
        start = self.tp.rank * size
        param.data[offset:offset + size].copy_(loaded[start:start + size])

    def checkpoint_rows(self, *shard_id: object) -> int:
        return self.local_sizes[self._part(*shard_id)] * self.tp.world_size

    def _part(self, *shard_id: object) -> int:
        (index,) = shard_id
        if not isinstance(index, int) or not 0 <= index < len(self.local_sizes):
            raise ValueError(f"shard id must be an int in [0, {len(self.local_sizes)}), got {index!r}")
        return index


def kv_heads_of_rank(num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first KV head, count) that `rank` holds.

    With at least as many KV heads as ranks each rank holds its own contiguous share; with
    fewer, each rank holds one replicated head: the one its query heads attend with.
    """
    if num_kv_heads >= world_size:
        count = num_kv_heads // world_size
        return rank * count, count
    return rank * num_kv_heads // world_size, 1


def check_head_split(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Raises ValueError unless the heads can be spread evenly over `world_size` ranks.

    Query heads must divide evenly; KV heads must divide evenly, or divide world_size so
    that every rank's query heads share a single (replicated) KV head.
    """
    kv_ok = num_kv_heads % world_size == 0 or world_size % num_kv_heads == 0
    if num_heads % num_kv_heads or num_heads % world_size or not kv_ok:
        raise ValueError(
            f"cannot split num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads} "
            f"over {world_size} tensor-parallel ranks"
        )


class QKVParallelLinear(ParallelLinear):
    """Query, key and value projections fused; rank r keeps its heads of each.

    Local layout of the output: [q heads of r | k heads of r | v heads of r], each head
    `head_dim` wide. Shard ids "q", "k", "v" name the checkpoint tensors.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TensorParallelGroup,
        ops: Ops = TORCH_OPS,
    ) -> None:
        check_head_split(num_heads, num_kv_heads, tp.world_size)
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.world_size
        self.first_kv_head, self.num_kv_heads = kv_heads_of_rank(num_kv_heads, tp.rank, tp.world_size)
        self.total_kv_heads = num_kv_heads
        out_local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out_local, bias, tp, ops)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _placement(self, which: object) -> tuple[int, int, int, int]:
        """(heads in the checkpoint tensor, first head kept, heads kept, local row offset)."""
        if which == "q":
            return self.num_heads * self.tp.world_size, self.tp.rank * self.num_heads, self.num_heads, 0
        if which in ("k", "v"):
            offset = self.q_size + (self.kv_size if which == "v" else 0)
            return self.total_kv_heads, self.first_kv_head, self.num_kv_heads, offset
        raise ValueError(f"shard id must be 'q', 'k' or 'v', got {which!r}")

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        (which,) = shard_id
        total, first, count, offset = self._placement(which)
        d = self.head_dim
        check_shape(loaded, [total * d, *param.shape[1:]])
        param.data[offset:offset + count * d].copy_(loaded[first * d:(first + count) * d])

    def checkpoint_rows(self, *shard_id: object) -> int:
        (which,) = shard_id
        return self._placement(which)[0] * self.head_dim


class RowParallelLinear(ParallelLinear):
    """y = sum over ranks of x_r W_r^T (+ bias): rank r keeps input columns of its share.

    The bias is replicated and added once, after the all-reduce.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp: TensorParallelGroup, ops: Ops = TORCH_OPS
    ) -> None:
        self.input_size_local = divide(input_size, tp.world_size, "input size")
        super().__init__(self.input_size_local, output_size, bias, tp, ops)

    def weight_loader(self, param: nn.Parameter, loaded: TensorSlice, *shard_id: object) -> None:
        if param.dim() == 1:  # the bias is not split
            default_weight_loader(param, loaded)
            return
        size = self.input_size_local
        check_shape(loaded, [param.shape[0], size * self.tp.world_size])
        param.data.copy_(loaded[:, self.tp.rank * size:(self.tp.rank + 1) * size])

    def checkpoint_rows(self, *shard_id: object) -> int:
        return self.weight.shape[0]

    def _load_scale_rows(self, param: nn.Parameter, scale: TensorSlice, *shard_id: object) -> None:
        default_weight_loader(param, scale)   # every rank holds every output row

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.matmul(x, self.bias)
        y = self.tp.all_reduce(self.matmul(x, None))
        return y if self.bias is None else y + self.bias
