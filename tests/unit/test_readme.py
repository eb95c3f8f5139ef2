"""The README's Python examples run as written: each section's blocks in order, in one
namespace (a later block uses an earlier one's names), in a scratch directory.

Sections that talk to a server at a fixed address ("Run it as a service", "Deploying
and scaling out") are not run here; their calls are the same SDK calls as these."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
RUNNABLE = {"Use it": (), "Checkpoint policies": (), "Bring your model": ("torch",)}


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no section '## {section}'"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.S | re.M)


@pytest.mark.parametrize("section", RUNNABLE)
def test_readme_examples_run(section, tmp_path, monkeypatch):
    for module in RUNNABLE[section]:
        pytest.importorskip(module)
    blocks = python_blocks(section)
    assert blocks, f"no Python example in '## {section}'"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's deprecation notices
        for number, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"README.md '{section}' block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"README '{section}' block {number} failed: {error!r}"
                ) from error
    assert printed.getvalue().strip(), "the examples print what they show"


def shell_lines(section: str) -> list[str]:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no section '## {section}'"
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_bring_your_model_commands_run(tmp_path):
    """The CLI lines of "Bring your model", run from a copy of the repository's
    examples/ (they write resnet.onnx and resnet.png where they run)."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    shutil.copytree(README.parent / "examples", tmp_path / "examples")
    lines = shell_lines("Bring your model")
    assert any("--torch" in line for line in lines) and any("--onnx" in line for line in lines)
    for line in lines:
        command = shlex.split(line)
        program = {"remat": [sys.executable, "-m", "remat.cli"], "python": [sys.executable]}
        done = subprocess.run(
            program[command[0]] + command[1:],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "resnet.png").stat().st_size > 0


def test_the_ops_table_lists_every_registered_op():
    from remat_server.ops import REGISTRY

    match = re.search(r"^## Ops\n(.*?)(?=^## )", README.read_text(), re.S | re.M)
    rows = [line for line in match.group(1).splitlines() if line.startswith("| ")]
    listed = {word for row in rows for word in re.findall(r"[a-z][a-z0-9_]*", row.split("|")[2])}
    assert sorted(set(REGISTRY) - listed) == []
