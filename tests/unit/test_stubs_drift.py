"""The checked-in stubs in protocol/remat_proto/v1 are exactly what proto/generate.py makes
from proto/remat/v1/*.proto (with the pinned grpcio-tools): nobody hand-edited them
and nobody forgot to regenerate after changing a .proto."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "protocol" / "remat_proto" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _files(directory: Path, generated_only: bool = True) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and (p.name.endswith(GENERATED_SUFFIXES) or not generated_only)
    }


def test_checked_in_stubs_match_freshly_generated_ones(tmp_path):
    pytest.importorskip("grpc_tools")
    generate = runpy.run_path(str(ROOT / "proto" / "generate.py"))["generate"]
    generate(tmp_path)
    fresh = _files(tmp_path / "remat_proto" / "v1")
    protos = sorted(p.stem for p in (ROOT / "proto" / "remat" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    # Every .proto yields its message module, its type stub and its gRPC module.
    assert sorted(fresh) == sorted(
        f"{stem}{suffix}" for stem in protos for suffix in GENERATED_SUFFIXES
    )
    # Everything in protocol/remat_proto/v1 is generated (an __init__.py would be the only
    # legitimate hand-written file there).
    checked_in = {
        name: data
        for name, data in _files(CHECKED_IN, generated_only=False).items()
        if name != "__init__.py"
    }
    missing = sorted(set(fresh) - set(checked_in))
    extra = sorted(set(checked_in) - set(fresh))
    assert not missing, f"not checked in (run `python proto/generate.py`): {missing}"
    assert not extra, f"checked in but no longer generated (delete them): {extra}"
    drifted = sorted(name for name, data in fresh.items() if checked_in[name] != data)
    assert not drifted, f"stale or hand-edited (run `python proto/generate.py`): {drifted}"
