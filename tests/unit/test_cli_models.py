"""`remat compare` and `remat plan` on the user's own models, run in process: an ONNX
file (`--onnx`) and a PyTorch factory (`--torch MODULE:FACTORY`), their losses (the
model's own or one added), wrt, --json and --plot, and the clear errors."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import numpy as np
import pytest

from remat.cli import main

# A conv + BatchNorm + ReLU + linear net, and factories good and bad, in plain torch.
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


    class WithLoss(Net):
        def forward(self, x, target):
            logits = super().forward(x)
            return logits, ((logits - target) ** 2).mean()


    class Classifier(Net):
        def forward(self, x, labels):
            return nn.functional.cross_entropy(super().forward(x), labels)


    class Branchy(Net):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent: torch.export refuses


    def make_model():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 3, 6, 6),)


    def make_with_loss():
        torch.manual_seed(0)
        return WithLoss(), (torch.randn(2, 3, 6, 6),), {"target": torch.zeros(2, 5)}


    def make_frozen():
        torch.manual_seed(0)
        net = Classifier()
        net.conv.requires_grad_(False)
        return net, [torch.randn(2, 3, 6, 6)], {"labels": torch.tensor([1, 3])}


    def make_module_only():
        return Net()


    def make_failing():
        raise RuntimeError("no weights here")


    def make_branchy():
        return Branchy(), (torch.randn(2, 3, 6, 6),)


    not_callable = 3
    """
)
POLICIES = ["--policies", "sqrt", "recompute_all"]
PARAMS = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def target():
    from remat_server import ServerConfig, create_server

    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    yield ["--target", f"127.0.0.1:{port}"]
    server.stop(None).wait()


@pytest.fixture(autouse=True)
def plain_output(monkeypatch):
    """Tables as a pipe gets them, whatever the environment says."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory):
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("factories")
    (folder / "cli_nets.py").write_text(FACTORY)
    return folder


@pytest.fixture
def on_path(factory_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_dir))
    monkeypatch.delitem(sys.modules, "cli_nets", raising=False)
    return factory_dir


@pytest.fixture(scope="module")
def onnx_file(factory_dir):
    """Net, exported in eval mode with a dynamic batch dimension."""
    import warnings

    import torch

    sys.path.insert(0, str(factory_dir))
    try:
        import cli_nets
    finally:
        sys.path.remove(str(factory_dir))
        sys.modules.pop("cli_nets", None)
    module, args = cli_nets.make_model()
    path = factory_dir / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return str(path)


def helper_onnx(path, inputs, outputs, nodes, initializers=()) -> str:
    """A hand-built ONNX model (no torch needed)."""
    from onnx import TensorProto, helper, save

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes,
        "handmade",
        [info(*i) for i in inputs],
        [info(*o) for o in outputs],
        list(initializers),
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `remat ARGS`, usage errors included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> dict[str, list[str]]:
    """The comparison table's cells by policy (cells are two or more spaces apart)."""
    found = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 5 and cells[0] in ("store_all", "sqrt", "recompute_all"):
            found[cells[0]] = cells[1:]
    return found


def bytes_of(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]


def assert_one_line_error(code, err, expected: str) -> None:
    assert code == 1, err
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def assert_usage_error(code, err, expected: str) -> None:
    """Exit 2, the usage, then one line naming the problem."""
    assert code == 2, err
    assert expected in err.strip().splitlines()[-1], err


# --- --onnx --------------------------------------------------------------------------------
def test_compare_onnx_prints_the_table_with_an_added_loss(capsys, target, onnx_file):
    code, out, err = cli(
        capsys, "compare", "--onnx", onnx_file, "--batch", "64", *POLICIES, *target
    )
    assert code == 0, err
    header = out.splitlines()[0]
    assert header.startswith(f"remat compare: ONNX model {onnx_file} (")
    assert "batch 64), loss 'loss' = mean(logits**2) (added); 3 policies" in header
    table = rows(out)
    assert list(table) == ["store_all", "sqrt", "recompute_all"]
    assert bytes_of(table["recompute_all"][0]) <= bytes_of(table["store_all"][0])
    assert "[3/3] recompute_all: peak" in err  # progress, one line per policy when piped


def test_compare_onnx_json_and_plot(capsys, target, onnx_file, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "onnx.png"
    code, out, err = cli(
        capsys, "compare", "--onnx", onnx_file, "--json", "--plot", plot, *POLICIES, *target
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["loss"] == "loss" and "batch 8" in data["workload"]  # the default batch
    assert "x" in data["wrt"] and len(data["wrt"]) > 1  # the data input and initializers
    assert [row["policy"] for row in data["rows"]] == ["store_all", "sqrt", "recompute_all"]
    assert all(row["peak_bytes"] > 0 and row["max_grad_diff"] == 0 for row in data["rows"])
    assert plot.stat().st_size > 0 and "plot written to" in err


def test_plan_onnx(capsys, target, onnx_file):
    code, out, err = cli(capsys, "plan", "--onnx", onnx_file, "--policy", "sqrt", *target)
    assert code == 0, err
    assert out.startswith(f"remat plan: ONNX model {onnx_file} (")
    assert "policy sqrt (dry run" in out.splitlines()[0]
    assert re.search(r"^peak bytes\s+[\d,]+\s+.*of store_all's", out, re.MULTILINE)


def test_onnx_model_loss_wrt_and_batch_binding(capsys, target, tmp_path):
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), "w")
    path = helper_onnx(
        tmp_path / "scalar.onnx",
        inputs=[("x", ["N", 3]), ("scale", ["N", 2])],
        outputs=[("y", ["N", 2]), ("loss", [])],
        nodes=[
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Mul", ["h", "scale"], ["y"]),
            helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0),
        ],
        initializers=[w],
    )
    code, out, err = cli(capsys, "compare", "--onnx", path, "--batch", "3", "--json", *target)
    assert code == 0, err
    data = json.loads(out)
    assert data["loss"] == "loss" and "(added)" not in data["workload"]  # the model's own
    assert "batch 3" in data["workload"] and data["wrt"] == ["x", "scale", "w"]
    code, out, err = cli(
        capsys, "plan", "--onnx", path, "--loss", "loss", "--wrt", "w", "--batch", "2", *target
    )
    assert code == 0 and "loss 'loss'" in out, err
    code, _, err = cli(capsys, "plan", "--onnx", path, "--wrt", "nope", *target)
    assert_one_line_error(code, err, "--wrt nope: not an input of the graph")
    code, _, err = cli(capsys, "plan", "--onnx", path, "--loss", "h", *target)
    assert_one_line_error(code, err, "--loss h: not an output of the graph")


def test_onnx_errors(capsys, tmp_path):
    code, _, err = cli(capsys, "compare", "--onnx", tmp_path / "missing.onnx")
    assert_one_line_error(code, err, "remat compare: error: cannot read ONNX file")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot onnx at all")
    code, _, err = cli(capsys, "plan", "--onnx", junk)
    assert_one_line_error(code, err, "is not an ONNX model")
    path = helper_onnx(
        tmp_path / "dynamic.onnx",
        inputs=[("x", ["N", "width"])],
        outputs=[("y", ["N", "width"])],
        nodes=[__import__("onnx").helper.make_node("Relu", ["x"], ["y"])],
    )
    code, _, err = cli(capsys, "plan", "--onnx", path)
    assert_one_line_error(code, err, "dimension 1 (width) is dynamic")
    code, _, err = cli(capsys, "plan", "--onnx", path, "--torch", "m:f")
    assert_usage_error(code, err, "argument --torch: not allowed with argument --onnx")
    code, _, err = cli(capsys, "plan", "--onnx", path, "--layers", "3")
    assert_usage_error(code, err, "--layers applies to --model mlp only")


# --- --torch -------------------------------------------------------------------------------
def test_compare_torch_module_factory(capsys, target, on_path):
    code, out, err = cli(capsys, "compare", "--torch", "cli_nets:make_model", *POLICIES, *target)
    assert code == 0, err
    header = out.splitlines()[0]
    assert header.startswith("remat compare: torch Net from cli_nets:make_model (")
    assert "x 2x3x6x6), loss 'loss' = mean(output**2) (added)" in header
    table = rows(out)
    assert list(table) == ["store_all", "sqrt", "recompute_all"]
    assert all(bytes_of(cells[0]) > 0 for cells in table.values())


def test_compare_torch_json_uses_the_models_loss(capsys, target, on_path):
    args = ["compare", "--torch", "cli_nets:make_with_loss", "--json", *POLICIES, *target]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    data = json.loads(out)
    # The only scalar output is the loss; the wrt are the parameters (not BatchNorm's
    # buffers) and the float example inputs, keyword ones too.
    assert data["loss"] == "output_1" and "(added)" not in data["workload"]
    assert data["wrt"] == [*PARAMS, "x", "target"]
    assert [row["policy"] for row in data["rows"]] == ["store_all", "sqrt", "recompute_all"]
    assert all(row["max_grad_diff"] == 0 for row in data["rows"])


def test_torch_inputs_wrt_and_loss(on_path):
    from remat.cli_torch import torch_workload

    load = torch_workload("cli_nets:make_frozen", wrt=None, loss=None)
    # The example inputs under forward's names; the loss is the only (scalar) output;
    # frozen parameters, buffers and integer inputs are not differentiated.
    assert load.inputs["labels"].tolist() == [1, 3] and load.inputs["x"].shape == (2, 3, 6, 6)
    assert load.loss == "output" and load.wrt == [*PARAMS[2:], "x"]
    assert load.inputs["bn.running_var"].tolist() == [1.0] * 4  # the module's buffers
    assert set(load.inputs) == {item.name for item in load.graph.inputs}


def test_plan_torch_from_a_file(capsys, target, factory_dir):
    spec = f"{factory_dir / 'cli_nets.py'}:make_model"
    code, out, err = cli(capsys, "plan", "--torch", spec, "--policy", "recompute_all", *target)
    assert code == 0, err
    assert out.startswith(f"remat plan: torch Net from {spec} (")
    assert "policy recompute_all (dry run" in out
    assert re.search(r"^recomputed nodes\s+[1-9][\d,]*", out, re.MULTILINE)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no_such_module_xyz:make", "cannot import no_such_module_xyz: ModuleNotFoundError"),
        ("cli_nets:make_nothing", "cli_nets has no function 'make_nothing'"),
        ("cli_nets:not_callable", "cli_nets has no function 'not_callable'"),
        ("cli_nets:make_module_only", "make_module_only() returned a Net; expected (module,"),
        ("cli_nets:make_failing", "make_failing() raised RuntimeError: no weights here"),
        ("cli_nets:make_branchy", "torch.export failed:"),
        ("missing/nets.py:make_model", "no such file missing/nets.py"),
    ],
)
def test_torch_factory_errors(capsys, on_path, spec, expected):
    code, _, err = cli(capsys, "plan", "--torch", spec)
    assert_one_line_error(code, err, expected)
    assert err.startswith("remat plan: error: --torch ")


def test_torch_usage_errors(capsys):
    code, _, err = cli(capsys, "compare", "--torch", "just_a_module")
    assert_usage_error(code, err, "'just_a_module': expected MODULE:FACTORY")
    code, _, err = cli(capsys, "plan", "--torch", "m:f", "--batch", "4")
    assert_usage_error(code, err, "--batch does not apply to --torch")
    code, _, err = cli(capsys, "plan", "--loss", "loss")
    assert_usage_error(code, err, "--loss applies to --graph, --onnx and --torch only")


def test_torch_missing_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    code, _, err = cli(capsys, "compare", "--torch", "cli_nets:make_model")
    assert_one_line_error(code, err, 'pip install "remat[torch]"')
