"""Every Triton kernel, as the public functions launch it, compiles for Hopper (sm_90) on CPU.

The interpreter checks what the kernels compute, not whether they compile for a GPU or
how they touch memory. Triton ships ptxas, so this test compiles each launch for sm_90
without a GPU and reads the PTX: it catches kernels that do not compile, tiles that
overflow shared memory, and loads that are not 16-byte vectors.

How: run as a script (in a subprocess, because TRITON_INTERPRET=1 replaces @triton.jit
when the kernel modules are imported), this file stubs out JITFunction.run, calls the
public functions at Llama-style shapes on CPU tensors to capture each launch's arguments,
specialises them as a real launch would (16-byte-aligned pointers and multiples of 16
marked divisible, ints equal to 1 folded), compiles, and prints JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one H100/H200 block may use (227 KB)
# PTX opcodes worth counting: scalar or vector global loads, async copies, tensor-core ops.
OPCODES = re.compile(
    r"\b(ld\.global(?:\.nc)?(?:\.v\d)?\.[bfsu]\d+|cp\.async\.c[ag]\.shared\.global|wgmma\.mma_async|mma\.sync"
    r"|griddepcontrol\.\w+)"
)


def _capture_launches() -> list[dict[str, Any]]:
    """Calls the public kernels with JITFunction.run stubbed; returns each launch's arguments."""
    import torch
    from triton.runtime.jit import JITFunction

    from shardgen.shard.kernels import activation, attention, kv_cache, linear, norm, rotary
    from shardgen.shard.kernels.attention_decode import default_decode_config

    launches: list[dict[str, Any]] = []

    def capture(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append({"fn": self, "args": args, "kwargs": kwargs})

    JITFunction.run = capture  # type: ignore[method-assign]
    tag = ""

    def paged(
        q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, q_lens: list[int], window: int, parts: int = 0,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        nonlocal tag
        tag = (f"attention D={head_dim} {dtype} q_lens={q_lens} window={window} partitions={parts or 'auto'}"
               f" cache={cache_dtype or dtype}")
        q = torch.zeros(sum(q_lens), q_heads, head_dim, dtype=dtype)
        cache = torch.zeros(64, 16, kv_heads, head_dim, dtype=cache_dtype or dtype)
        tables = torch.zeros(len(q_lens), 32, dtype=torch.int32)
        seq_lens = torch.full((len(q_lens),), 400, dtype=torch.int32)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        decode = dataclasses.replace(default_decode_config(head_dim, cache.dtype), num_partitions=parts or None)
        attention.paged_attention(q, cache, cache, tables, seq_lens, cu, max(q_lens), 0.1, window, decode_config=decode)

    def tagged(name: str) -> None:
        nonlocal tag
        tag = name

    def record(start: int) -> None:
        for launch in launches[start:]:
            launch.setdefault("tag", tag)

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    for call in (
        lambda: paged(32, 8, 128, bf16, [1], 0, parts=8),  # split decode: partitions + reduce
        lambda: paged(32, 8, 128, bf16, [1] * 64, 512),  # one partition per sequence
        lambda: paged(32, 8, 128, bf16, [300, 7], 0),
        lambda: paged(32, 8, 128, bf16, [300, 7], 4096),
        lambda: paged(16, 2, 64, torch.float16, [1, 200], 0),
        lambda: paged(8, 1, 256, bf16, [1], 0, parts=4),
        lambda: paged(8, 1, 256, bf16, [100], 0),
        lambda: paged(8, 2, 256, torch.float32, [1], 0),
        lambda: paged(8, 2, 256, torch.float32, [100], 0),
        lambda: paged(32, 8, 128, bf16, [1] * 64, 0, cache_dtype=fp8),  # --kv-cache-dtype fp8
        lambda: paged(32, 8, 128, bf16, [1], 0, parts=8, cache_dtype=fp8),
        lambda: paged(32, 8, 128, bf16, [300, 1, 7], 0, cache_dtype=fp8),
    ):
        start = len(launches)
        call()
        record(start)
    hidden, inter, tokens = 4096, 14336, 8
    x = torch.zeros(tokens, hidden, dtype=bf16)
    for name, call in (
        ("rms_norm", lambda: norm.rms_norm(x, torch.zeros(hidden, dtype=bf16), 1e-5)),
        ("fused_add_rms_norm", lambda: norm.fused_add_rms_norm(x, x, torch.zeros(hidden, dtype=bf16), 1e-5)),
        ("silu_and_mul", lambda: activation.silu_and_mul(torch.zeros(tokens, 2 * inter, dtype=bf16))),
        ("rotary", lambda: rotary.apply_rotary(
            torch.zeros(tokens, 32, 128, dtype=bf16), torch.zeros(tokens, 8, 128, dtype=bf16),
            torch.zeros(tokens, 64), torch.zeros(tokens, 64),
        )),
        ("rotary_and_write_kv", lambda: rotary.rotary_and_write_kv(
            torch.zeros(tokens, 32, 128, dtype=bf16), torch.zeros(tokens, 8, 128, dtype=bf16),
            torch.zeros(tokens, 8, 128, dtype=bf16), torch.zeros(tokens, 64), torch.zeros(tokens, 64),
            torch.zeros(4, 16, 8, 128, dtype=bf16), torch.zeros(4, 16, 8, 128, dtype=bf16),
            torch.arange(tokens, dtype=torch.int64),
        )),
        ("linear", lambda: linear.linear(x, torch.zeros(6144, hidden, dtype=bf16))),
        ("linear long k", lambda: linear.linear(
            torch.zeros(tokens, inter, dtype=bf16), torch.zeros(hidden, inter, dtype=bf16))),
        ("linear broadcast", lambda: linear.linear(x[:1], torch.zeros(2 * inter, hidden, dtype=bf16))),
        ("linear split", lambda: linear.linear(
            x, torch.zeros(hidden, hidden, dtype=bf16), None, linear.LinearConfig(64, 128, split_k=4))),
        ("write_kv", lambda: kv_cache.write_kv(
            torch.zeros(tokens, 8, 128, dtype=bf16), torch.zeros(tokens, 8, 128, dtype=bf16),
            torch.zeros(4, 16, 8, 128, dtype=bf16), torch.zeros(4, 16, 8, 128, dtype=bf16),
            torch.arange(tokens, dtype=torch.int64),
        )),
        ("write_kv fp8", lambda: kv_cache.write_kv(
            torch.zeros(tokens, 8, 128, dtype=bf16), torch.zeros(tokens, 8, 128, dtype=bf16),
            torch.zeros(4, 16, 8, 128, dtype=fp8), torch.zeros(4, 16, 8, 128, dtype=fp8),
            torch.arange(tokens, dtype=torch.int64),
        )),
        ("rotary_and_write_kv fp8", lambda: rotary.rotary_and_write_kv(
            torch.zeros(tokens, 32, 128, dtype=bf16), torch.zeros(tokens, 8, 128, dtype=bf16),
            torch.zeros(tokens, 8, 128, dtype=bf16), torch.zeros(tokens, 64), torch.zeros(tokens, 64),
            torch.zeros(4, 16, 8, 128, dtype=fp8), torch.zeros(4, 16, 8, 128, dtype=fp8),
            torch.arange(tokens, dtype=torch.int64),
        )),
    ):
        start = len(launches)
        tagged(name)
        call()
        record(start)
    return launches


def _compile(launch: dict[str, Any]) -> dict[str, Any]:
    """Compiles one captured launch for sm_90, specialised like a real launch."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch["fn"]
    options = {k: launch["kwargs"].pop(k) for k in ("num_warps", "num_stages") if k in launch["kwargs"]}
    values = dict(zip(fn.arg_names, launch["args"])) | launch["kwargs"]
    constexpr_names = {fn.arg_names[p.num] for p in fn.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values[name]
        if name in constexpr_names or (isinstance(value, int) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                     torch.float8_e4m3fn: "fp8e4nv", torch.int32: "i32", torch.int64: "i64"}[value.dtype]
            signature[name] = "*" + dtype
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    counts = collections.Counter(OPCODES.findall(kernel.asm["ptx"]))
    return {"kernel": fn.__name__, "tag": launch["tag"], "shared": kernel.metadata.shared, "opcodes": dict(counts),
            "options": options}


def main() -> None:
    launches = _capture_launches()
    # The kernels a decode step runs also launch with programmatic dependent launch on
    # Hopper (CPU tensors say no): each such launch once more with it on.
    dependent = [dict(launch, kwargs=dict(launch["kwargs"], USE_PDL=True), tag=launch["tag"] + " pdl")
                 for launch in launches if "USE_PDL" in launch["kwargs"]]
    print(json.dumps([_compile(launch) for launch in launches + dependent]))


def _nvidia_backend_available() -> bool:
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return "nvidia" in backends and (major, minor) >= (3, 4)


@pytest.fixture(scope="module")
def compiled() -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not _nvidia_backend_available(), reason="needs Triton >= 3.4 with its NVIDIA backend")


def test_every_launch_compiles_within_shared_memory(compiled: list[dict[str, Any]]) -> None:
    kernels = {c["kernel"] for c in compiled}
    assert kernels == {
        "_decode_partition_kernel", "_decode_reduce_kernel", "_prefill_kernel", "_rms_norm_kernel",
        "_silu_and_mul_kernel", "_rotary_kernel", "_rotary_write_kv_kernel", "_write_kv_kernel",
        "_linear_kernel", "_sum_splits_kernel",
    }
    for c in compiled:
        assert c["shared"] <= SHARED_MEMORY_LIMIT, c


def test_dependent_launches_wait_for_the_kernel_before(compiled: list[dict[str, Any]]) -> None:
    """With USE_PDL every program waits for the kernel queued before (griddepcontrol.wait)
    and then releases the next one; without it neither instruction is there."""
    dependent = {c["kernel"] for c in compiled if c["tag"].endswith(" pdl")}
    assert dependent == {
        "_decode_partition_kernel", "_decode_reduce_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
        "_rotary_write_kv_kernel", "_linear_kernel", "_sum_splits_kernel",
    }
    for c in compiled:
        ops = c["opcodes"]
        if c["tag"].endswith(" pdl"):
            assert ops.get("griddepcontrol.wait", 0) >= 1 and ops.get("griddepcontrol.launch_dependents", 0) >= 1, c
        else:
            assert not any(op.startswith("griddepcontrol") for op in ops), c


def test_the_linear_streams_w_in_16_byte_pieces(compiled: list[dict[str, Any]]) -> None:
    """The small-batch linear pipelines W through cp.async on the tensor-core path; the
    broadcast path (one row, narrow tiles) loads it in 16-byte vectors."""
    linears = [c for c in compiled if c["kernel"] == "_linear_kernel"]
    assert len(linears) == 8  # each with and without dependent launch
    for c in linears:
        opcode = "ld.global.v4.b32" if c["tag"].startswith("linear broadcast") else "cp.async.cg.shared.global"
        assert c["opcodes"].get(opcode, 0) > 0, c


def test_attention_streams_kv_in_16_byte_loads(compiled: list[dict[str, Any]]) -> None:
    """K/V tiles arrive in 16-byte pieces: by cp.async.cg (several tiles in flight) wherever
    the config pipelines (num_stages > 1), else by ld.global.v4; never element by element."""
    for c in compiled:
        if c["kernel"] not in ("_decode_partition_kernel", "_prefill_kernel"):
            continue
        ops = c["opcodes"]
        if c["options"].get("num_stages", 1) > 1:
            assert ops.get("cp.async.cg.shared.global", 0) > 0, c
        else:
            assert ops.get("ld.global.v4.b32", 0) > 0, c
        assert not any(op.endswith(("b16", "u16", "s16")) for op in ops), c


def test_prefill_uses_hopper_tensor_cores(compiled: list[dict[str, Any]]) -> None:
    for c in compiled:
        if c["kernel"] == "_prefill_kernel" and "float32" not in c["tag"]:
            assert c["opcodes"].get("wgmma.mma_async", 0) > 0, c


def test_row_kernels_load_16_byte_vectors(compiled: list[dict[str, Any]]) -> None:
    for c in compiled:
        if c["kernel"] in (
            "_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel", "_rotary_write_kv_kernel", "_write_kv_kernel",
        ):
            ops = c["opcodes"]
            assert ops.get("ld.global.v4.b32", 0) > 0, c
            assert not any(op.endswith(("b16", "u16", "s16")) for op in ops), c


if __name__ == "__main__":
    main()
