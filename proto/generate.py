"""Regenerate the Python stubs in protocol/remat_proto/v1 from proto/remat/v1/*.proto.

    python proto/generate.py            # writes protocol/remat_proto/v1
    python proto/generate.py OUT_DIR    # writes OUT_DIR/remat_proto/v1 (the drift test)

The .proto files keep their path and `package remat.v1`, so the wire (service and
message names) and the descriptors' file names are what any other language's client
sees. Only the Python modules live elsewhere: protoc names a module after its .proto's
path (`remat.v1.graph_pb2`), so the generated imports are rewritten to the protocol
package (`remat_proto.v1.graph_pb2`), the one place both the SDK and the server import
them from.

Needs grpcio-tools (the `test` extra pins the version the checked-in stubs came from).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "remat_proto"
# `from remat.v1 import graph_pb2 as ...` (modules and .pyi stubs alike).
_GENERATED_IMPORT = re.compile(rb"^from remat\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # imported here: a test-only dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    target = out_dir / PACKAGE / "v1"
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "remat" / "v1").glob("*.proto")
    )
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for path in sorted((Path(raw) / "remat" / "v1").iterdir()):
            code = _GENERATED_IMPORT.sub(f"from {PACKAGE}.v1 import ".encode(), path.read_bytes())
            (target / path.name).write_bytes(code)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "protocol")
