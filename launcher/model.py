"""Model resolution: a local folder, a hub id (downloaded with huggingface_hub), or the demo."""

from __future__ import annotations

import logging
from pathlib import Path

from shardgen.launcher.demo import ensure_demo_model

logger = logging.getLogger(__name__)

# What a shard and the router read: weights, config, tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]


class ModelResolutionError(RuntimeError):
    """The model could not be found or fetched; the message says what to do."""


def resolve_model(model_id: str | None, revision: str | None = None) -> Path:
    """Return a local folder holding the model's config, weights and tokenizer."""
    if model_id is None:
        folder = ensure_demo_model()
        logger.warning("no --model-id given: serving the built-in DEMO model with RANDOM weights "
                       "from %s (its output is gibberish)", folder)
        return folder
    local = Path(model_id).expanduser()
    if local.is_dir():
        _check_folder(local)
        return local.resolve()
    if local.exists() or model_id.startswith((".", "/", "~")):
        raise ModelResolutionError(f"--model-id {model_id!r} is not a model folder")
    return _download(model_id, revision)


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelResolutionError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    if not any(folder.glob("*.safetensors")):
        raise ModelResolutionError(
            f"{folder} has no *.safetensors weights (only safetensors checkpoints are loaded)")


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as error:
        raise ModelResolutionError(
            f"cannot fetch {model_id!r} from the hub and it is not in the local cache "
            f"(offline, or HF_HUB_OFFLINE is set): pass a local folder with --model-id "
            f"({error})") from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ModelResolutionError(f"cannot fetch {model_id!r} from the hub: {error}") from error
    _check_folder(folder)
    return folder
