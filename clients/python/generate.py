"""Regenerate the Python stubs of the agentrun protobuf contract.

Run from anywhere: ``python clients/python/generate.py``. CI runs it and fails when
the committed stubs differ from what it produces.
"""

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins are installed next to this interpreter, which may
    # be a virtual environment that is not on PATH.
    scripts = pathlib.Path(sys.executable).parent
    return protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            f"--mypy_out={HERE}",
            f"--mypy_grpc_out={HERE}",
            *protos,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
