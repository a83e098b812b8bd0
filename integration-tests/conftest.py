"""Fixtures that boot the real stack once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import STORIES, Server


@pytest.fixture(scope="module")
def stories_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """stories260K on one CPU shard with default settings."""
    if not STORIES.is_dir():
        pytest.skip(f"fixture model missing: {STORIES}")
    log = tmp_path_factory.mktemp("server") / "launcher.log"
    server = Server("--model-id", str(STORIES), log_path=log)
    yield server
    server.stop()
