"""Choosing the hot-path ops once per model: Triton kernels or the torch reference.

The model-level check runs the Triton path in the interpreter (TRITON_INTERPRET=1 set
before Python starts, as `make test` does) against the torch path on the same weights:
same logits to fp32 rounding, same greedy tokens. On a GPU the same check runs in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_model_harness import PagedDriver, save_random_model, split_schedule
from transformers import LlamaConfig, Qwen2Config

from shardgen.shard.layers.ops import TORCH_OPS, resolve_backend, select_ops
from shardgen.shard.models import load_model

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CPU = torch.device("cpu")
# head_dim 16: the smallest the Triton attention takes.
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=131, max_position_embeddings=64, initializer_range=0.2)


def test_auto_is_triton_on_cuda_and_torch_elsewhere() -> None:
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    assert select_ops("auto", CPU, head_dim=128) is TORCH_OPS
    assert select_ops("torch", torch.device("cuda", 0), head_dim=128) is TORCH_OPS


def test_auto_falls_back_to_torch_for_a_head_size_triton_cannot_take() -> None:
    assert select_ops("auto", torch.device("cuda", 0), head_dim=80) is TORCH_OPS


def test_asking_for_triton_with_an_unsupported_head_size_names_it() -> None:
    with pytest.raises(ValueError, match="has 80"):
        select_ops("triton", torch.device("cuda", 0), head_dim=80)


def test_an_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, triton, torch.*'cudnn'"):
        resolve_backend("cudnn", "cuda")


def test_every_layer_of_a_model_uses_the_ops_it_was_built_with(tmp_path) -> None:
    pytest.importorskip("triton")
    save_random_model(tmp_path, LlamaConfig(**SMALL))
    model = load_model(tmp_path, dtype=torch.float32, device=CPU, kernel_backend="triton")
    ops = select_ops("triton", CPU, head_dim=16)
    assert model.ops is ops and ops.graph_safe and not TORCH_OPS.graph_safe
    layer = model.model.layers[0]
    assert layer.self_attn.attn._paged_attention is ops.paged_attention
    assert layer.self_attn.attn._write_kv is ops.write_kv
    assert layer.self_attn.rotary_and_write_kv is ops.rotary_and_write_kv
    assert layer.mlp.silu_and_mul is ops.silu_and_mul
    assert layer.input_layernorm._fused is ops.fused_add_rms_norm
    assert model.model.norm._norm is ops.rms_norm


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 set before Python starts")
@pytest.mark.parametrize("config", [LlamaConfig(**SMALL), Qwen2Config(**{
    **SMALL, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1})],
    ids=["llama-gqa", "qwen2-bias-window"])
def test_the_triton_path_matches_the_torch_path(tmp_path, config) -> None:
    """Prefill, a chunk after a cached prefix, mixed steps and decodes, on scattered blocks."""
    save_random_model(tmp_path, config)
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, SMALL["vocab_size"], (n,), generator=generator) for n in (14, 9)]
    logits = {}
    for backend in ("torch", "triton"):
        model = load_model(tmp_path, dtype=torch.float32, device=CPU, kernel_backend=backend)
        logits[backend] = PagedDriver(model, sequences).run(split_schedule(14, 9))
    for want, got in zip(logits["torch"], logits["triton"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
