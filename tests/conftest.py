"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from router_http_doubles import STORIES
from shardgen.router.tokenization import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """stories260K's tokenizer, as the router wraps it."""
    if not STORIES.is_dir():
        pytest.skip(f"fixture tokenizer missing: {STORIES}")
    return Tokenizer.from_pretrained(STORIES)
