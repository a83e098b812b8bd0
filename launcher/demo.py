"""The built-in demo model: a tiny Llama with seeded random weights, made on first use.

Served when the launcher gets no --model-id, so that a fresh machine can run the whole
stack with no download. Everything is deterministic: the same folder contents on every
machine (byte-level tokenizer with no merges, weights drawn from a fixed-seed generator).
It writes gibberish: the weights are random.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_NAME = "shardgen-demo-llama-v1"
_SEED = 20261123
_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shardgen"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model's folder, creating it first if it is not there yet."""
    folder = (cache_dir or default_cache_dir()) / DEMO_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename, so a half-written model is never served.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=folder.parent))
    try:
        _write_tokenizer(staging)
        _write_config(staging)
        _write_weights(staging)
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():  # not a lost race with another launcher
            raise
    else:
        logger.info("created the demo model in %s", folder)
    return folder


def _write_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(_CONFIG, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*_SPECIAL_TOKENS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _write_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(_SEED)
    hidden, inter = _CONFIG["hidden_size"], _CONFIG["intermediate_size"]
    heads, kv_heads = _CONFIG["num_attention_heads"], _CONFIG["num_key_value_heads"]
    head_dim = hidden // heads
    vocab = _CONFIG["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(_CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        tensors |= {
            f"{prefix}.self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            f"{prefix}.mlp.gate_proj.weight": normal(inter, hidden),
            f"{prefix}.mlp.up_proj.weight": normal(inter, hidden),
            f"{prefix}.mlp.down_proj.weight": normal(hidden, inter),
            f"{prefix}.input_layernorm.weight": torch.ones(hidden),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
        }
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
