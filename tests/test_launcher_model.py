"""Model resolution and the built-in demo model."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from shardgen.launcher.demo import ensure_demo_model
from shardgen.launcher.model import ModelResolutionError, resolve_model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_demo_model_is_deterministic_and_loads_in_transformers(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path / "a")
    second = ensure_demo_model(tmp_path / "b")
    assert _digest(first) == _digest(second)
    assert ensure_demo_model(tmp_path / "a") == first  # reused, not rebuilt

    tokenizer = AutoTokenizer.from_pretrained(first)
    ids = tokenizer("Hello wörld")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello wörld"
    assert tokenizer.chat_template

    model = LlamaForCausalLM.from_pretrained(first)
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(ids) + 4)


def test_local_folder_without_weights_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="is not a model folder"):
        resolve_model(str(tmp_path / "nope"))


def test_hub_id_offline_fails_cleanly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelResolutionError, match="offline"):
        resolve_model("some-org/some-model")
