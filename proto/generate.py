"""Regenerate the Python stubs in client/remat/v1 from proto/remat/v1/*.proto.

    python proto/generate.py            # writes client/remat/v1
    python proto/generate.py OUT_DIR    # writes OUT_DIR/remat/v1 (the drift test)

Needs grpcio-tools (the `test` extra pins the version the checked-in stubs came from).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # imported here: a test-only dependency
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    (out_dir / "remat" / "v1").mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "remat" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client")
