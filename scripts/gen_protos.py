"""Generate the Python gRPC code for every proto under protos/ into infermesh/.

The output folders mirror the proto package path (infermesh/<service>/v1/), so
the generated imports (`from infermesh.common.v1 import common_pb2`) work as is.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def main() -> int:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *files,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # Generated folders become regular packages so mypy and pytest see them.
    for f in files:
        pkg = ROOT / pathlib.Path(f).parent
        while pkg != ROOT / "infermesh":
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    print(f"generated {len(files)} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
