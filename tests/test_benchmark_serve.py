"""benchmark/serve.py's datasets: the same arguments give the same prompts, and datasets
drawn with one seed share no prompt beginnings (one served after the other on a server
must not find its prompts in the prefix cache)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from router_http_doubles import SHARED

SERVE = Path(__file__).resolve().parents[1] / "benchmark" / "serve.py"
LLAMA3 = SHARED / "tokenizers" / "llama3"


def load_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_datasets_of_one_seed_are_reproducible_and_share_no_prompt_beginning() -> None:
    serve = load_serve()
    common = ["--tokenizer", str(LLAMA3), "--input-len", "64", "--seed", "0"]
    fixed = serve.build_dataset(serve.parse_args([*common, "--dataset", "fixed", "--num-prompts", "8"]))
    shared = serve.build_dataset(serve.parse_args(
        [*common, "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "2",
         "--prefix-len", "128"]))
    again = serve.build_dataset(serve.parse_args([*common, "--dataset", "fixed", "--num-prompts", "8"]))
    assert [r.prompt for r in fixed] == [r.prompt for r in again]
    assert all(r.prompt_tokens == 64 for r in fixed)
    # 8 x 64 fixed ids and 2 x (128 + 2 x 64) shared-prefix ids: with one stream, fixed
    # prompt 4 began as group 1's prefix.
    beginnings = {r.prompt[:40] for r in fixed}
    assert not beginnings & {r.prompt[:40] for r in shared}
