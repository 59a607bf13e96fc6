"""Generate the Python gRPC code for protos/ with grpcio-tools' bundled protoc.

The generated modules are committed beside the .proto files; a test regenerates them into a
temporary folder and fails on any difference, so the contract and the code never drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """All .proto files of the loraplex contract, relative to the proto root."""
    return sorted(p.relative_to(root) for p in (root / "loraplex").rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc for every .proto under ``root`` and write Python code into ``out_dir``."""
    grpc_include = Path(protoc.__file__).parent / "_proto"
    files = [str(p) for p in proto_files(root)]
    args = [
        "protoc",
        f"-I{root}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {files}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*"))


def main(argv: list[str]) -> int:
    """Regenerate into the given folder (default: the proto root itself)."""
    out = Path(argv[1]) if len(argv) > 1 else PROTO_ROOT
    out.mkdir(parents=True, exist_ok=True)
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
