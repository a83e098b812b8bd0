"""Where the Triton kernel tests can run: on a CUDA GPU, or in the interpreter on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETING or not HAS_CUDA else "cuda"
needs_kernels = pytest.mark.skipif(
    not (INTERPRETING or HAS_CUDA),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 set before Python starts",
)


def gpu_only(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a real-size test: gpu, and skipped without CUDA or inside the interpreter."""
    skip = pytest.mark.skipif(not HAS_CUDA or INTERPRETING, reason="needs a CUDA GPU, not the interpreter")
    return pytest.mark.gpu(skip(test))
