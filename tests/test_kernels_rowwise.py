"""The row-wise Triton kernels against torch oracles written here.

write_kv, rms_norm, fused_add_rms_norm, apply_rotary, rotary_and_write_kv, silu_and_mul. Runs in the Triton
interpreter on CPU (TRITON_INTERPRET=1 set before Python starts, as `make test` does) or
on a CUDA GPU; skipped otherwise. Tests marked gpu use real sizes and bf16, GPU only.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from shardgen.shard.kernels.activation import silu_and_mul  # noqa: E402
from shardgen.shard.kernels.kv_cache import write_kv  # noqa: E402
from shardgen.shard.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from shardgen.shard.kernels.rotary import apply_rotary, rotary_and_write_kv  # noqa: E402
from shardgen.shard.layers import rotary as torch_rotary  # noqa: E402
from kernel_env import DEVICE, gpu_only, needs_kernels  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def nan_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like hand out NaN-filled float tensors: an unwritten element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def assert_mostly_bit_equal(got: torch.Tensor, want: torch.Tensor, min_fraction: float = 0.99) -> None:
    """Same rounding steps as the oracle: in fp16/bf16, identical bits but for rare ties.

    (Sum order and rsqrt differ in the last fp32 bits, which flips a low-precision rounding
    now and then; a different order of roundings would differ in far more elements. In
    fp32 those last bits show everywhere, so only closeness is checked.)
    """
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    if got.dtype != torch.float32:
        equal = (got == want).float().mean().item()
        assert equal >= min_fraction, f"only {equal:.4f} of the elements match the oracle bit for bit"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[got.dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------ write_kv


def _cache_pair(
    num_blocks: int, block_size: int, heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches filled with distinct values (k ascending, v negated), so any stray write shows."""
    k = torch.arange(num_blocks * block_size * heads * head_dim, dtype=torch.float32).reshape(
        num_blocks, block_size, heads, head_dim
    )
    return k.to(dtype).to(DEVICE), (-k).to(dtype).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "head_dim", "block_size"), [(2, 32, 16), (3, 48, 32), (8, 128, 16)])
def test_write_kv_stores_rows_and_skips_padding(dtype: torch.dtype, heads: int, head_dim: int, block_size: int) -> None:
    num_blocks = 4
    k_cache, v_cache = _cache_pair(num_blocks, block_size, heads, head_dim, dtype)
    slots = [5, -1, block_size + 3, 3 * block_size + block_size - 1, -7, 0]
    key = randn(len(slots), heads, head_dim, dtype=dtype, seed=1)
    value = randn(len(slots), heads, head_dim, dtype=dtype, seed=2)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            want_k.view(-1, heads, head_dim)[slot] = key[t]
            want_v.view(-1, heads, head_dim)[slot] = value[t]
    write_kv(key, value, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@needs_kernels
def test_write_kv_from_fused_qkv_views_with_cast() -> None:
    """k and v sliced out of a [T, (Hq + 2 Hkv) * D] projection, fp32 into an fp16 cache."""
    tokens, hq, hkv, d = 5, 4, 2, 16
    qkv = randn(tokens, (hq + 2 * hkv) * d)
    key = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    value = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    assert not key.is_contiguous()
    k_cache, v_cache = _cache_pair(3, 16, hkv, d, torch.float16)
    slots = torch.tensor([17, 2, 40, 41, 9], dtype=torch.int64, device=DEVICE)
    write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, hkv, d)[slots], key.half())
    assert torch.equal(v_cache.view(-1, hkv, d)[slots], value.half())


def test_write_kv_rejects_bad_arguments() -> None:
    k_cache, v_cache = _cache_pair(2, 16, 2, 32, torch.float32)
    key = randn(3, 2, 32)
    slots = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping must be torch.int64"):
        write_kv(key, key, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="2 slots for 3 tokens"):
        write_kv(key, key, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match=r"do not match the cache's \[2, 32\]"):
        write_kv(key[:, :1], key[:, :1], k_cache, v_cache, slots)


# ------------------------------------------------------------------------------ RMSNorm


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, step by step."""
    hidden = x.float()
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), [(7, 64), (3, 200), (2, 1024)])
def test_rms_norm_matches_hf(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=1) * 3
    weight = (1 + randn(hidden, dtype=dtype, seed=2)).to(dtype)
    assert_mostly_bit_equal(rms_norm(x, weight, 1e-6), hf_rms_norm(x, weight, 1e-6))


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_hf(dtype: torch.dtype) -> None:
    x = randn(6, 96, dtype=dtype, seed=1)
    residual = randn(6, 96, dtype=dtype, seed=2) * 4
    weight = randn(96, dtype=dtype, seed=3)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, residual + x)
    assert_mostly_bit_equal(normed, hf_rms_norm(residual + x, weight, 1e-5))


@needs_kernels
def test_rms_norm_promotes_like_hf_and_takes_views() -> None:
    """fp16 activations with an fp32 weight give fp32; strided rows and 3-D inputs work."""
    x = randn(4, 2, 64, dtype=torch.float16)
    weight = randn(64, seed=5)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_mostly_bit_equal(out, hf_rms_norm(x, weight, 1e-6))
    wide = randn(5, 160)
    view = wide[:, 16:80]
    assert_mostly_bit_equal(rms_norm(view, weight, 1e-6), hf_rms_norm(view, weight, 1e-6))


def test_rms_norm_rejects_bad_arguments() -> None:
    x = randn(3, 64)
    with pytest.raises(ValueError, match="weight has 32 elements for rows of 64"):
        rms_norm(x, randn(32), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.half(), randn(64), 1e-6)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        rms_norm(x.t(), randn(3), 1e-6)


# ------------------------------------------------------------------------------ rotary


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half on the first 2 * cos.shape[1] dims, float64, then rounded to x's dtype."""
    half = cos.shape[1]
    x64 = x.double()
    x1, x2 = x64[..., :half], x64[..., half : 2 * half]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    out = x64.clone()
    out[..., :half] = x1 * c - x2 * s
    out[..., half : 2 * half] = x2 * c + x1 * s
    return out.to(x.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "head_dim"), [(4, 2, 32), (6, 3, 64), (8, 1, 128)])
def test_rotary_matches_rotate_half(dtype: torch.dtype, hq: int, hkv: int, head_dim: int) -> None:
    tokens = 5
    q, k = randn(tokens, hq, head_dim, dtype=dtype, seed=1), randn(tokens, hkv, head_dim, dtype=dtype, seed=2)
    angles = randn(tokens, head_dim // 2, seed=3) * 10
    cos, sin = angles.cos(), angles.sin()
    want_q, want_k = rotated(q, cos, sin), rotated(k, cos, sin)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    assert got_q is q and got_k is k  # in place
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, want_k, atol=tol, rtol=tol)


@needs_kernels
def test_rotary_on_fused_qkv_views_and_partial_rotary() -> None:
    """Views into one qkv buffer rotate in place; with R < D the tail and v stay untouched."""
    tokens, hq, hkv, d, half = 3, 4, 2, 32, 8
    qkv = randn(tokens, (hq + 2 * hkv) * d)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    angles = randn(tokens, half, seed=4)
    apply_rotary(q, k, angles.cos(), angles.sin())
    q_before = before[:, : hq * d].view(tokens, hq, d)
    k_before = before[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    torch.testing.assert_close(q, rotated(q_before, angles.cos(), angles.sin()))
    torch.testing.assert_close(k, rotated(k_before, angles.cos(), angles.sin()))
    assert torch.equal(q[..., 2 * half :], q_before[..., 2 * half :])
    assert torch.equal(qkv[:, (hq + hkv) * d :], before[:, (hq + hkv) * d :])


def test_rotary_rejects_bad_arguments() -> None:
    q, k = randn(3, 4, 32), randn(3, 2, 32)
    with pytest.raises(ValueError, match="more than head_dim 32"):
        apply_rotary(q, k, randn(3, 17), randn(3, 17))
    with pytest.raises(ValueError, match="cos has 2 rows for 3 tokens"):
        apply_rotary(q, k, randn(2, 16), randn(2, 16))


# ------------------------------------------------------------------------------ rotary + write_kv


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize(("hq", "hkv", "head_dim"), [(4, 2, 64), (8, 2, 128)])
def test_rotary_and_write_kv_is_apply_rotary_then_write_kv(
    dtype: torch.dtype, tokens: int, hq: int, hkv: int, head_dim: int
) -> None:
    """Against the torch reference (apply_rotary, write_kv) and, bit for bit, the two Triton kernels."""
    block_size, num_blocks = 16, 5
    q, k = randn(tokens, hq, head_dim, dtype=dtype, seed=1), randn(tokens, hkv, head_dim, dtype=dtype, seed=2)
    v = randn(tokens, hkv, head_dim, dtype=dtype, seed=3)
    angles = randn(tokens, head_dim // 2, seed=4) * 10
    cos, sin = angles.cos(), angles.sin()
    # Distinct slots scattered over every block, not in token order.
    gen = torch.Generator().manual_seed(5)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    k_cache, v_cache = _cache_pair(num_blocks, block_size, hkv, head_dim, dtype)
    initial_k, initial_v = k_cache.clone(), v_cache.clone()

    torch_k_cache, torch_v_cache = k_cache.clone(), v_cache.clone()
    torch_q, torch_k = torch_rotary.rotary_and_write_kv(q, k, v, cos, sin, torch_k_cache, torch_v_cache, slots)
    unfused_k_cache, unfused_v_cache = k_cache.clone(), v_cache.clone()
    unfused_q, unfused_k = apply_rotary(q.clone(), k.clone(), cos, sin)
    write_kv(unfused_k, v, unfused_k_cache, unfused_v_cache, slots)

    got_q, got_k = rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert got_q is q and got_k is k  # in place
    assert torch.equal(got_q, unfused_q) and torch.equal(got_k, unfused_k)
    assert torch.equal(k_cache, unfused_k_cache) and torch.equal(v_cache, unfused_v_cache)
    # The torch reference rotates in q's dtype, the kernels in fp32: close, not equal, in fp16.
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got_q, torch_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, torch_k, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache, torch_k_cache, atol=tol, rtol=tol)
    assert torch.equal(v_cache, torch_v_cache)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(k_cache.view(-1, hkv, head_dim)[untouched], initial_k.view(-1, hkv, head_dim)[untouched])
    assert torch.equal(v_cache.view(-1, hkv, head_dim)[untouched], initial_v.view(-1, hkv, head_dim)[untouched])
    assert torch.equal(k_cache.view(-1, hkv, head_dim)[slots], got_k)


@needs_kernels
def test_rotary_and_write_kv_on_fused_qkv_views_with_padding_cast_and_partial_rotary() -> None:
    """q/k/v are views of one qkv buffer, fp32 into an fp16 cache, R < D; slot -1 is rotated, not stored."""
    tokens, hq, hkv, d, half = 4, 4, 2, 32, 8
    qkv = randn(tokens, (hq + 2 * hkv) * d)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    angles = randn(tokens, half, seed=4)
    slots = torch.tensor([17, -1, 40, 2], dtype=torch.int64, device=DEVICE)
    k_cache, v_cache = _cache_pair(3, 16, hkv, d, torch.float16)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k = apply_rotary(before[:, : hq * d].view(tokens, hq, d).clone(),
                                  before[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d).clone(),
                                  angles.cos(), angles.sin())
    write_kv(want_k, v.clone(), want_k_cache, want_v_cache, slots)

    rotary_and_write_kv(q, k, v, angles.cos(), angles.sin(), k_cache, v_cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(k[..., 2 * half :], before[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)[..., 2 * half :])
    assert torch.equal(qkv[:, (hq + hkv) * d :], before[:, (hq + hkv) * d :])  # v is only read
    assert torch.equal(k_cache, want_k_cache) and torch.equal(v_cache, want_v_cache)
    stored = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, hkv, d)[stored], k[slots >= 0].half())


def test_rotary_and_write_kv_rejects_bad_arguments() -> None:
    q, k = randn(3, 4, 32), randn(3, 2, 32)
    k_cache, v_cache = _cache_pair(2, 16, 2, 32, torch.float32)
    cos = randn(3, 16)
    slots = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="cos has 2 rows for 3 tokens"):
        rotary_and_write_kv(q, k, k, cos[:2], cos[:2], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="2 slots for 3 tokens"):
        rotary_and_write_kv(q, k, k, cos, cos, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="value shape"):
        rotary_and_write_kv(q, k, k[:, :1], cos, cos, k_cache, v_cache, slots)


# ------------------------------------------------------------------------------ SiLU-and-mul


@needs_kernels
@pytest.mark.usefixtures("nan_allocations")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(5, 48), (2, 1500)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = randn(tokens, 2 * inter, dtype=dtype) * 4
    want = F.silu(x[:, :inter]) * x[:, inter:]
    assert_mostly_bit_equal(silu_and_mul(x), want)


@needs_kernels
def test_silu_and_mul_on_a_strided_view() -> None:
    wide = randn(3, 100)
    x = wide[:, :64]
    assert_mostly_bit_equal(silu_and_mul(x), F.silu(x[:, :32]) * x[:, 32:])


def test_silu_and_mul_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(randn(2, 7))


# ------------------------------------------------------------------------------ GPU, real sizes


@gpu_only
@pytest.mark.parametrize("tokens", [1, 257, 4096])
def test_gpu_rowwise_llama8b_sizes_bf16(tokens: int) -> None:
    dtype = torch.bfloat16
    x = randn(tokens, 4096, dtype=dtype)
    residual = randn(tokens, 4096, dtype=dtype, seed=1)
    weight = randn(4096, dtype=dtype, seed=2)
    assert_mostly_bit_equal(rms_norm(x, weight, 1e-5), hf_rms_norm(x, weight, 1e-5))
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, residual + x)
    assert_mostly_bit_equal(normed, hf_rms_norm(residual + x, weight, 1e-5))
    gate_up = randn(tokens, 2 * 14336, dtype=dtype, seed=3)
    assert_mostly_bit_equal(silu_and_mul(gate_up), F.silu(gate_up[:, :14336]) * gate_up[:, 14336:])
    q, k = randn(tokens, 32, 128, dtype=dtype, seed=4), randn(tokens, 8, 128, dtype=dtype, seed=5)
    angles = randn(tokens, 64, seed=6) * 100
    want_q, want_k = rotated(q, angles.cos(), angles.sin()), rotated(k, angles.cos(), angles.sin())
    apply_rotary(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(q, want_q, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k, want_k, atol=1e-2, rtol=1e-2)
    k_cache = torch.zeros(tokens // 16 + 2, 16, 8, 128, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device=DEVICE)[:tokens]
    write_kv(k, q[:, :8], k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 8, 128)[slots], k)
    assert torch.equal(v_cache.view(-1, 8, 128)[slots], q[:, :8])


@gpu_only
@pytest.mark.parametrize("tokens", [1, 257])
def test_gpu_rotary_and_write_kv_llama8b_sizes_bf16(tokens: int) -> None:
    """Bit for bit the unfused kernels (apply_rotary, then write_kv) at Llama-3.1-8B sizes, with a padding row."""
    dtype = torch.bfloat16
    q, k = randn(tokens, 32, 128, dtype=dtype, seed=1), randn(tokens, 8, 128, dtype=dtype, seed=2)
    v = randn(tokens, 8, 128, dtype=dtype, seed=3)
    angles = randn(tokens, 64, seed=4) * 100
    k_cache, v_cache = _cache_pair(tokens // 16 + 2, 16, 8, 128, dtype)
    slots = torch.randperm(k_cache.shape[0] * 16, device=DEVICE)[:tokens]
    slots[0] = -1
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k = apply_rotary(q.clone(), k.clone(), angles.cos(), angles.sin())
    write_kv(want_k, v, want_k_cache, want_v_cache, slots)
    rotary_and_write_kv(q, k, v, angles.cos(), angles.sin(), k_cache, v_cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(k_cache, want_k_cache) and torch.equal(v_cache, want_v_cache)
