"""`--quantize fp8`: the projections' weights in float8 e4m3 with per-channel scales, their
inputs quantized per token (shard/layers/quant.py).

A layer must compute the contract: the product of the dequantized values, in float32. The
model's oracle is transformers on the same checkpoint with each of its seven projections
replaced by the contract's primitives (quantize the input per token, fp8_linear): the shard,
with its fused projections, through real gRPC, must give its greedy tokens token for token.
The unquantized model parts from them within ~16 tokens on stories260K, so the comparison
catches a shard that skipped the quantization or quantized another way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shard_rpc import STORIES, MiniRouter, Reference, running_shard
from shardgen.proto import generate_pb2
from shardgen.shard.distributed import TensorParallelGroup
from shardgen.shard.layers.linear import ColumnParallelLinear, ParallelLinear, RowParallelLinear
from shardgen.shard.layers.quant import FP8_DTYPE, FP8_MAX, fp8_linear, quantize_rows_fp8, quantize_weight_fp8
from shardgen.shard.models import load_model

PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They saw a big dog", "The cat",
           "One day, a little girl named"]
WARMUP = generate_pb2.WarmupRequest(max_batch_prefill_tokens=64, max_batch_size=4, max_total_tokens=128)
NEW_TOKENS = 40


def test_rows_are_scaled_to_the_fp8_range() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3e-3, 1e-3, -6e-3]])
    quantized, scale = quantize_rows_fp8(x)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (3, 1) and scale.dtype == torch.float32
    # The largest magnitude of each row maps to +-448; a zero row keeps a positive scale.
    assert quantized.float()[0].tolist() == [224.0, -448.0, 112.0]
    assert quantized.float()[2].abs().max().item() == FP8_MAX
    assert quantized.float()[1].tolist() == [0.0, 0.0, 0.0] and scale[1].item() > 0
    assert torch.allclose(quantized.float() * scale, x, rtol=2**-4, atol=0)


def test_weights_take_one_scale_per_output_channel() -> None:
    weight = torch.randn(6, 32) * torch.logspace(-3, 1, 6)[:, None]
    quantized, scale = quantize_weight_fp8(weight)
    assert quantized.shape == (6, 32) and scale.shape == (1, 6)
    assert torch.equal(scale[0], weight.abs().amax(dim=1) / FP8_MAX)
    assert torch.allclose(quantized.float() * scale.T, weight, rtol=2**-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_weights_quantize_to_the_bytes_they_take_on_cpu() -> None:
    """So a checkpoint quantized on one device is what --quantize fp8 makes on another (a
    tensor over a Python number is a reciprocal-multiply on CUDA: scales were an ulp off)."""
    weight = torch.randn(256, 128) * 0.2
    (cpu_values, cpu_scale), (gpu_values, gpu_scale) = quantize_weight_fp8(weight), quantize_weight_fp8(weight.cuda())
    assert torch.equal(cpu_values.view(torch.uint8), gpu_values.cpu().view(torch.uint8))
    assert torch.equal(cpu_scale, gpu_scale.cpu())


@pytest.mark.parametrize("layer_class", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [False, True])
def test_a_quantized_layer_computes_the_contract(layer_class: type[ParallelLinear], bias: bool) -> None:
    torch.manual_seed(0)
    layer = layer_class(48, 32, bias, TensorParallelGroup(0, 1, None))
    nn.init.normal_(layer.weight, std=0.05)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(5, 48)
    exact = layer(x)
    layer.quantize_fp8(quantize_rows_fp8)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (1, 32)
    x_q, x_scale = quantize_rows_fp8(x)
    want = (x_q.float() * x_scale) @ (layer.weight.float() * layer.weight_scale.T).T
    if bias:
        want = want + layer.bias
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, fp8_linear(x_q, x_scale, layer.weight, layer.weight_scale,
                                               layer.bias, torch.float32))
    # fp8 keeps 3 mantissa bits: near the float32 layer, not equal to it.
    assert not torch.equal(got, exact)
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()


def test_loading_quantizes_the_projections_and_nothing_else() -> None:
    model = load_model(STORIES, dtype=torch.float32, device=torch.device("cpu"), quantize="fp8")
    projections = [m for m in model.modules() if isinstance(m, ParallelLinear)]
    assert len(projections) == 4 * model.num_layers
    assert all(m.weight.dtype == FP8_DTYPE and m.weight_scale is not None for m in projections)
    others = {name: p.dtype for name, p in model.named_parameters() if p.dtype != FP8_DTYPE}
    assert others and set(others.values()) == {torch.float32}
    assert not any(name.endswith("proj.weight") for name in others)
    assert "lm_head.weight" in others or "model.embed_tokens.weight" in others


def test_an_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantize must be one of fp8, got 'int4'"):
        load_model(STORIES, dtype=torch.float32, device=torch.device("cpu"), quantize="int4")


class SimulatedFp8Linear(nn.Module):
    """An nn.Linear of transformers' model replaced by the fp8 contract: its weight quantized
    per output channel, its input per token, the product by fp8_linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.scale = quantize_weight_fp8(linear.weight.data)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
        y = fp8_linear(x_q, x_scale, self.weight, self.scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], -1)


@pytest.fixture(scope="module")
def references() -> tuple[Reference, Reference]:
    """(transformers as it is, transformers with every projection simulated in fp8)."""
    simulated = Reference()
    for layer in simulated.model.model.layers:
        for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(module, name, SimulatedFp8Linear(getattr(module, name)))
    return Reference(), simulated


def teacher_forced_gaps(reference: Reference, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """For each generated token, how far its log-probability lies below the best one's under
    `reference`, given the prompt and the tokens before it (0 where it is the argmax)."""
    with torch.no_grad():
        logits = reference.model(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.max(dim=-1).values - logprobs.gather(1, torch.tensor(generated)[:, None])[:, 0]


def test_fp8_generation_follows_the_simulated_reference(references: tuple[Reference, Reference]) -> None:
    exact, simulated = references
    prompts = [exact.encode(text) for text in PROMPTS]
    with running_shard("--num-blocks", "64", "--quantize", "fp8") as shard:
        router = MiniRouter(shard.stub, shard.stub.Warmup(WARMUP).num_blocks)
        generations = router.prefill(1, [router.request(i, p, max_new_tokens=NEW_TOKENS)
                                          for i, p in enumerate(prompts)])
        router.run_to_completion()
        generated = [router.sequences[i].generated for i in range(len(prompts))]
        assert shard.stub.Info(generate_pb2.InfoRequest()).dtype == "float32"
    assert all(len(tokens) == NEW_TOKENS for tokens in generated)
    # The first token's log-probability is the simulated model's (the same arithmetic).
    for prompt, tokens, generation in zip(prompts, generated, generations):
        with torch.no_grad():
            logits = simulated.model(torch.tensor([prompt])).logits[0, -1].float()
        assert abs(torch.log_softmax(logits, dim=-1)[tokens[0]].item() - generation.tokens.logprobs[0]) < 1e-4
    # Every greedy token is the simulated model's choice, or within a hair of it: rounding to
    # fp8 is a step function, so sums taken in another order (paged attention, a decode of
    # one row) can move an activation across a step where two tokens are nearly tied.
    simulated_gaps = torch.cat([teacher_forced_gaps(simulated, p, g) for p, g in zip(prompts, generated)])
    exact_gaps = torch.cat([teacher_forced_gaps(exact, p, g) for p, g in zip(prompts, generated)])
    assert simulated_gaps.max() < 0.05
    assert (simulated_gaps > 0).sum() <= 2
    # Against the unquantized model the same tokens are clearly not all greedy.
    assert exact_gaps.max() > 0.1
