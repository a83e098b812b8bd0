"""The native Llama/Mistral/Qwen2 stack against transformers' implementations.

Every variant is a small random float32 checkpoint; our logits over the paged cache must
match transformers' full forward of each sequence, whether a sequence is computed in one
step or in pieces (cached prefix, chunk, decodes) batched with another sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_harness import STORIES, PagedDriver, reference_logits, save_random_model, split_schedule
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from shardgen.shard.models import get_model_class, load_model

ATOL = 1e-4
SMALL = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=131, max_position_embeddings=64, initializer_range=0.2,
)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama-gqa": LlamaConfig(**SMALL),
    "llama3-rope-tied-mqa": LlamaConfig(**{
        **SMALL, "num_key_value_heads": 1, "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    }),
    "llama-yarn": LlamaConfig(**{
        **SMALL, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        },
    }),
    "llama-bias-head-dim": LlamaConfig(**{**SMALL, "head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    "mistral-window": MistralConfig(**{**SMALL, "sliding_window": 5}),
    "qwen2-bias-window": Qwen2Config(**{
        **SMALL, "num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
    }),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    reference = save_random_model(path, CONFIGS[request.param])
    return path, reference


def _sequences(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in (17, 11)]


def test_one_step_prefill_matches_transformers(checkpoint) -> None:
    path, reference = checkpoint
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    sequences = _sequences(model.vocab_size)
    logits = PagedDriver(model, sequences).run([[(0, 17), (1, 11)]])
    for seq, ours in zip(sequences, logits):
        torch.testing.assert_close(ours, reference_logits(reference, seq), atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_match_transformers(checkpoint) -> None:
    path, reference = checkpoint
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    sequences = _sequences(model.vocab_size)
    logits = PagedDriver(model, sequences, block_size=4, seed=3).run(split_schedule(17, 11))
    for seq, ours in zip(sequences, logits):
        torch.testing.assert_close(ours, reference_logits(reference, seq), atol=ATOL, rtol=0)


def test_prefix_shared_with_another_sequence(checkpoint) -> None:
    """A prompt whose first blocks were written by an earlier request computes only the rest."""
    path, reference = checkpoint
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    first = _sequences(model.vocab_size)[0]
    second = torch.cat([first[:8], torch.tensor([3, 1, 4, 1, 5])])
    driver = PagedDriver(model, [first, second], block_size=4)
    driver.step([(0, 17)])
    driver.share_prefix(source=0, target=1, num_blocks=2)
    driver.step([(1, 5)])
    torch.testing.assert_close(driver.logits[1][0], reference_logits(reference, second)[8:], atol=ATOL, rtol=0)


def test_model_reports_its_shapes(checkpoint) -> None:
    path, reference = checkpoint
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    config = reference.config
    assert model.num_layers == config.num_hidden_layers
    assert model.num_kv_heads == config.num_key_value_heads
    assert model.head_dim == reference.model.layers[0].self_attn.head_dim
    assert model.vocab_size == config.vocab_size


@pytest.mark.parametrize("schedule", [[[(0, 40)]], [[(0, 23)], [(0, 9)], [(0, 1)]] + [[(0, 1)]] * 7])
def test_stories260k_matches_transformers(schedule: list[list[tuple[int, int]]]) -> None:
    model = load_model(STORIES, dtype=torch.float32, device=torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="eager").eval()
    sequence = torch.randint(0, model.vocab_size, (40,), generator=torch.Generator().manual_seed(7))
    (ours,) = PagedDriver(model, [sequence], block_size=8).run(schedule)
    torch.testing.assert_close(ours, reference_logits(reference, sequence), atol=ATOL, rtol=0)


def test_bfloat16_weights_give_float32_logits_close_to_float32() -> None:
    sequence = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(STORIES, dtype=dtype, device=torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {dtype}
        (runs[dtype],) = PagedDriver(model, [sequence]).run([[(0, 12)]])
    assert runs[torch.bfloat16].dtype == torch.float32
    # bfloat16 keeps ~3 significant digits: about 0.2 on logits of magnitude 13 here, where a
    # broken bfloat16 path (say, a rotation in the wrong dtype) is off by whole units.
    torch.testing.assert_close(runs[torch.bfloat16], runs[torch.float32], atol=0.5, rtol=0.02)


def test_unknown_architecture_names_it_and_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_unsupported_rope_and_activation_are_refused(tmp_path: Path) -> None:
    dynamic = LlamaConfig(**{**SMALL, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}})
    save_random_model(tmp_path / "dynamic", dynamic)
    with pytest.raises(ValueError, match="'dynamic'.*default, linear, llama3, yarn"):
        load_model(tmp_path / "dynamic", dtype=torch.float32, device=torch.device("cpu"))
    save_random_model(tmp_path / "gelu", LlamaConfig(**{**SMALL, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_model(tmp_path / "gelu", dtype=torch.float32, device=torch.device("cpu"))
