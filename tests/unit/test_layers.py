"""The layers hold: the domain stages import neither gRPC nor generated code, the server
never imports the SDK, the SDK imports the server only to start one in process, and no
module imports another that (directly or not) imports it back.

Imports are read from the source (every `import`, at module level or inside a
function, except under `if TYPE_CHECKING:`), so a lazy import cannot hide a cycle; the
first test also imports the domain for real and looks at what got loaded.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "remat": ROOT / "client" / "remat",
    "remat_server": ROOT / "server" / "remat_server",
    "remat_proto": ROOT / "protocol" / "remat_proto",
}
DOMAIN = (
    "remat_server.graph",
    "remat_server.ops",
    "remat_server.autodiff",
    "remat_server.checkpoint",
    "remat_server.runtime",
    "remat_server.engine",
)
# What pulls in gRPC or protobuf (generated code and the modules that use it).
WIRE = ("grpc", "google.protobuf", "remat_proto.v1", "remat_proto.wire", "remat_proto.chunks")
# The only places the SDK may import the server: starting one in process, `remat serve`.
SDK_TO_SERVER = {("remat.calls", "start_in_process_server"), ("remat.cli", "_serve")}


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            if "v1" in path.relative_to(directory).parts:  # generated stubs
                continue
            parts = [package, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(imported module, enclosing function or "") for every import in `module`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = function or node.name
        if isinstance(node, ast.Import):
            found.extend((alias.name, function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                target = f"{base}.{alias.name}"
                found.append((target if target in MODULES else base, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_domain_imports_neither_grpc_nor_generated_code():
    offending = [
        (module, target)
        for module, imports in IMPORTS.items()
        if _under(module, DOMAIN)
        for target, _ in imports
        if _under(target, WIRE)
    ]
    assert not offending, offending
    # And for real: importing every domain module loads neither.
    domain = sorted(m for m in MODULES if _under(m, DOMAIN))
    code = (
        f"import sys\nfor m in {domain!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith(('grpc', 'google.protobuf', "
        f"'remat_proto.v1'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]", loaded


def test_the_server_never_imports_the_sdk():
    offending = [
        (module, target)
        for module, imports in IMPORTS.items()
        if module.startswith("remat_server")
        for target, _ in imports
        if _under(target, ("remat",))
    ]
    assert not offending, offending


def test_the_protocol_imports_neither_side():
    offending = [
        (module, target)
        for module, imports in IMPORTS.items()
        if module.startswith("remat_proto")
        for target, _ in imports
        if _under(target, ("remat", "remat_server"))
    ]
    assert not offending, offending


def test_the_sdk_imports_the_server_only_to_start_one():
    used = {
        (module, function)
        for module, imports in IMPORTS.items()
        if _under(module, ("remat",))
        for target, function in imports
        if _under(target, ("remat_server",))
    }
    assert used <= SDK_TO_SERVER, sorted(used - SDK_TO_SERVER)


def test_no_import_cycles():
    graph = {
        module: {target for target, _ in imports if target in MODULES and target != module}
        for module, imports in IMPORTS.items()
    }
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_the_reader_sees_lazy_imports():
    # The checks above are only as good as the import reader: a function-level import
    # and a relative `from . import module` must both be found.
    imports = dict(IMPORTS["remat.calls"])
    assert imports.get("remat_server") == "start_in_process_server"
    assert ("remat_server.checkpoint.planners.bounds", "") in IMPORTS[
        "remat_server.checkpoint.planners.dtr"
    ]
