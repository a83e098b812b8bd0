"""Build hook: generate the gRPC stubs from proto/generate.proto with grpcio-tools.

The stubs are never edited by hand nor committed; every build (normal or editable)
writes them next to the .proto file before the Python modules are collected.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "proto"


def generate_stubs() -> None:
    from grpc_tools import protoc  # a build requirement

    with tempfile.TemporaryDirectory() as tmp:
        # Mirror the import path so the generated code imports `shardgen.proto.*`.
        src = pathlib.Path(tmp, "in", "shardgen", "proto")
        out = pathlib.Path(tmp, "out")
        src.mkdir(parents=True)
        out.mkdir()
        shutil.copy(PROTO_DIR / "generate.proto", src / "generate.proto")
        include = str(pathlib.Path(protoc.__file__).parent / "_proto")
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}/in",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            str(src / "generate.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/generate.proto")
        for generated in (out / "shardgen" / "proto").iterdir():
            shutil.copy(generated, PROTO_DIR / generated.name)


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
