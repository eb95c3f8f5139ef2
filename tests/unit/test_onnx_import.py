"""The ONNX importer (`remat_proto.onnx_import`, `remat.from_onnx`): hand-built models
per op family against ONNX Runtime (forward, float32) and centered differences
(gradients, float64), and the model zoo exported by torch's legacy exporter in
training mode: forward against ONNX Runtime, gradients against torch.autograd.

The safety side (limits, external data, hostile models) is in test_onnx_limits.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo_onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import remat
from remat_proto.onnx_import import OnnxImportError, convert
from remat_server.engine import Engine, RunRequest

ENGINE = Engine()
RNG = np.random.default_rng(0)


# --- helpers ----------------------------------------------------------------------------
def make(nodes, inputs, outputs, inits=None, opset=17):
    """A model: `inputs` {name: array} (their dtypes and shapes), `outputs` [names] or
    {name: elem type}, `inits` {name: array}."""
    outputs = outputs if isinstance(outputs, dict) else dict.fromkeys(outputs, T.FLOAT)
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for name, a in inputs.items()
        ],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in outputs.items()],
        [numpy_helper.from_array(a, name) for name, a in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs)


def ort_outputs(model, feeds) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: outputs are declared without shapes
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def remat_outputs(model, feeds, dtype=None) -> dict[str, np.ndarray]:
    imported = convert(model.SerializeToString(), dtype=dtype)
    feeds = {k: v for k, v in feeds.items() if any(i.name == k for i in imported.spec.inputs)}
    return ENGINE.run(RunRequest(imported.spec, {**feeds, **imported.params})).outputs


def check_forward(model, feeds, rtol=1e-5, atol=1e-5):
    expected, got = ort_outputs(model, feeds), remat_outputs(model, feeds)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        assert got[name].dtype == value.dtype, name
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)
    return got


def check_grads(model, feeds, wrt, tol=1e-6, h=1e-6):
    """Gradients of sum(out * R) (every float output) against centered differences, in
    float64, for inputs and initializers named in `wrt`."""
    imported = convert(model.SerializeToString(), dtype="float64")
    spec = imported.spec
    values = {
        k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
        for k, v in {**feeds, **imported.params}.items()
    }
    outputs = ENGINE.run(RunRequest(spec, values)).outputs
    rng = np.random.default_rng(1)
    weights = {
        k: rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1.0, 1.0], v.shape)
        for k, v in outputs.items()
        if v.dtype == np.float64
    }

    def loss(vals):
        outs = ENGINE.run(RunRequest(spec, vals)).outputs
        return sum(float(np.sum(outs[k] * w)) for k, w in weights.items())

    grads = ENGINE.run(RunRequest(spec, values, wrt=tuple(wrt), cotangents=weights)).grads
    for name in wrt:
        numeric = np.zeros(values[name].shape)
        for index in np.ndindex(numeric.shape):
            total = []
            for step in (h, -h):
                bumped = values[name].copy()
                bumped[index] += step
                total.append(loss({**values, name: bumped}))
            numeric[index] = (total[0] - total[1]) / (2 * h)
        scale = max(float(np.abs(numeric).max(initial=0.0)), 1e-3)
        error = float(np.abs(grads[name] - numeric).max(initial=0.0)) / scale
        assert error < tol, f"gradient of {name}: relative error {error:.3g}"


def f32(*shape, low=-1.0, high=1.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def spec_ops(model, **kwargs) -> list[str]:
    return [n.op for n in convert(model.SerializeToString(), **kwargs).spec.nodes]


# --- elementwise and activations -------------------------------------------------------------
UNARY = [
    "Relu",
    "Neg",
    "Exp",
    "Abs",
    "Tanh",
    "Sigmoid",
    "Erf",
    "Reciprocal",
    "Softmax",
    "LogSoftmax",
    "Elu",
    "Selu",
    "HardSigmoid",
    "Sqrt",
    "Log",
    "Sin",
    "Cos",
]


@pytest.mark.parametrize("op", UNARY)
def test_unary_ops(op):
    x = (
        f32(3, 4, low=0.2, high=2.0)
        if op in ("Sqrt", "Log", "Reciprocal")
        else f32(3, 4, low=-2, high=2)
    )
    attrs = {"axis": 0} if op in ("Softmax", "LogSoftmax") else {}
    model = make([node(op, ["x"], ["y"], **attrs)], {"x": x}, ["y"])
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x"])


def test_activation_attributes_and_versions():
    x = f32(2, 5, low=-3, high=3)
    slope = np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)
    nodes = [
        node("LeakyRelu", ["x"], ["a"], alpha=0.2),
        node("Clip", ["x", "lo", "hi"], ["b"]),
        node("PRelu", ["x", "slope"], ["c"]),
        node("Elu", ["x"], ["d"], alpha=0.7),
        node("HardSigmoid", ["x"], ["e"], alpha=0.25, beta=0.4),
        node("Pow", ["x", "three"], ["f"]),
    ]
    inits = {"lo": np.array(-0.5, np.float32), "hi": np.array(1.5, np.float32), "slope": slope}
    model = make(nodes, {"x": x}, list("abcdef"), {**inits, "three": np.array(3.0, np.float32)})
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x", "slope"])
    gelu = make(
        [node("Gelu", ["x"], ["y"], approximate="tanh"), node("Gelu", ["x"], ["z"])],
        {"x": x},
        ["y", "z"],
        opset=20,
    )
    check_forward(gelu, {"x": x})
    assert spec_ops(gelu) == ["gelu", "gelu"]


def test_clip_at_its_bounds_and_relu_at_zero_follow_pytorch():
    torch = pytest.importorskip("torch")
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
    model = make(
        [node("Clip", ["x", "lo", "hi"], ["c"]), node("Relu", ["x"], ["r"])],
        {"x": x},
        ["c", "r"],
        {"lo": np.array(-0.5, np.float32), "hi": np.array(1.0, np.float32)},
    )
    imported = convert(model, dtype="float64")
    ones = {"c": np.ones(6), "r": np.ones(6)}
    grads = ENGINE.run(
        RunRequest(
            imported.spec,
            {"x": x.astype(np.float64), **imported.params},
            wrt=("x",),
            cotangents=ones,
        )
    ).grads["x"]
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (torch.clamp(t, -0.5, 1.0).sum() + torch.relu(t).sum()).backward()
    np.testing.assert_array_equal(grads, t.grad.numpy())


def test_binary_broadcasting_comparisons_and_logic():
    a, b = f32(2, 3, 4), f32(3, 1)
    nodes = [
        node("Add", ["a", "b"], ["add"]),
        node("Sub", ["b", "a"], ["sub"]),
        node("Mul", ["a", "b"], ["mul"]),
        node("Div", ["a", "two"], ["div"]),
        node("Max", ["a", "b", "two"], ["max"]),
        node("Min", ["a", "b"], ["min"]),
        node("Sum", ["a", "b", "a"], ["sum"]),
        node("Mean", ["a", "b"], ["mean"]),
        node("Greater", ["a", "b"], ["gt"]),
        node("LessOrEqual", ["a", "b"], ["le"]),
        node("Not", ["gt"], ["not"]),
        node("Xor", ["gt", "not"], ["xor"]),
        node("Or", ["gt", "le"], ["or"]),
        node("Where", ["gt", "a", "b"], ["where"]),
        node("Equal", ["a", "a"], ["eq"]),
        node("IsNaN", ["div"], ["nan"]),
        node("IsInf", ["div"], ["inf"], detect_negative=0),
    ]
    bools = ("gt", "le", "not", "xor", "or", "eq", "nan", "inf")
    outputs = {n.output[0]: (T.BOOL if n.output[0] in bools else T.FLOAT) for n in nodes}
    model = make(nodes, {"a": a, "b": b}, outputs, {"two": np.array(2.0, np.float32)})
    check_forward(model, {"a": a, "b": b})
    grad_model = make(
        nodes[:9] + [nodes[13]],
        {"a": a, "b": b},
        ["add", "sub", "mul", "div", "min", "sum", "mean", "where"],
        {"two": np.array(2.0, np.float32)},
    )
    check_grads(grad_model, {"a": a, "b": b}, ["a", "b"])


def test_matmul_and_gemm():
    a, b, w = f32(2, 3, 4), f32(4, 5), f32(5, 4)
    x, bias = f32(3, 4), f32(5)
    nodes = [
        node("MatMul", ["a", "b"], ["mm"]),
        node("MatMul", ["a", "v"], ["mv"]),
        node("Gemm", ["x", "w", "bias"], ["gemm"], transB=1, alpha=0.5, beta=2.0),
        node("Gemm", ["xt", "b"], ["gemm_t"], transA=1),
    ]
    inits = {"w": w, "bias": bias, "v": f32(4), "xt": f32(4, 3)}
    model = make(nodes, {"a": a, "b": b, "x": x}, ["mm", "mv", "gemm", "gemm_t"], inits)
    check_forward(model, {"a": a, "b": b, "x": x})
    check_grads(model, {"a": a, "b": b, "x": x}, ["a", "w", "bias", "v"])


@pytest.mark.parametrize("opset", [13, 18])
def test_reductions_and_arg_reductions(opset):
    x = f32(2, 3, 4)
    axes = np.array([1, -1], np.int64)
    nodes = [node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0)]
    for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2", "ReduceL1"):
        if opset >= 18:
            nodes.append(node(op, ["x", "axes"], [op.lower()]))
        else:
            nodes.append(node(op, ["x"], [op.lower()], axes=[1, -1]))
    nodes += [
        node("ReduceSum", ["x"], ["all"]),
        node("ArgMax", ["x"], ["argmax"], axis=1),
        node("ArgMin", ["x"], ["argmin"], axis=-1, keepdims=0),
    ]
    outputs = {n.output[0]: T.FLOAT for n in nodes}
    outputs.update(argmax=T.INT64, argmin=T.INT64)
    model = make(nodes, {"x": x}, outputs, {"axes": axes}, opset=opset)
    check_forward(model, {"x": x})
    check_grads(
        make(nodes[:-2], {"x": x}, list(outputs)[:-2], {"axes": axes}, opset=opset), {"x": x}, ["x"]
    )


# --- shapes and indexing --------------------------------------------------------------------
def test_shape_ops_on_computed_values():
    x = f32(2, 3, 4)
    ints = {
        "shape": np.array([0, -1], np.int64),
        "ax0": np.array([0], np.int64),
        "starts": np.array([2, 0], np.int64),
        "ends": np.array([-100, 3], np.int64),
        "axes": np.array([2, 1], np.int64),
        "steps": np.array([-1, 2], np.int64),
        "idx": np.array([[2, -1], [0, 1]], np.int64),
        "scalar": np.array(-2, np.int64),
        "split": np.array([1, 3], np.int64),
        "target": np.array([2, 2, 3, 4], np.int64),
        "reps": np.array([1, 2, 1], np.int64),
        "pads": np.array([0, 1, -1, 0, 2, 1], np.int64),
        "el_idx": np.array([[[0, 2, 1, 0]]], np.int64),
    }
    nodes = [
        node("Reshape", ["x", "shape"], ["reshape"]),
        node("Flatten", ["x"], ["flatten"], axis=2),
        node("Unsqueeze", ["x", "ax0"], ["unsq"]),
        node("Squeeze", ["unsq", "ax0"], ["sq"]),
        node("Transpose", ["x"], ["transpose"], perm=[2, 0, 1]),
        node("Concat", ["x", "x"], ["concat"], axis=-1),
        node("Slice", ["x", "starts", "ends", "axes", "steps"], ["slice"]),
        node("Gather", ["x", "idx"], ["gather"], axis=2),
        node("Gather", ["x", "scalar"], ["gather0"], axis=1),
        node("GatherElements", ["x", "el_idx"], ["gather_el"], axis=1),
        node("Split", ["x", "split"], ["split0", "split1"], axis=2),
        node("Expand", ["x", "target"], ["expand"]),
        node("Tile", ["x", "reps"], ["tile"]),
        node("Trilu", ["x"], ["trilu"], upper=0),
        node("Pad", ["x", "pads"], ["pad"], mode="constant"),
        node("Pad", ["x", "pads"], ["reflect"], mode="reflect"),
        node("Pad", ["x", "pads"], ["edge"], mode="edge"),
        node("Identity", ["x"], ["identity"]),
        node("Cast", ["x"], ["cast"], to=T.DOUBLE),
        node("Shape", ["x"], ["shape_out"]),
    ]
    outputs = {n.output[k]: T.FLOAT for n in nodes for k in range(len(n.output))}
    outputs.update(cast=T.DOUBLE, shape_out=T.INT64)
    model = make(nodes, {"x": x}, outputs, ints)
    check_forward(model, {"x": x})
    float_outputs = [k for k, v in outputs.items() if v == T.FLOAT]
    check_grads(make(nodes[:-2], {"x": x}, float_outputs, ints), {"x": x}, ["x"])


@pytest.mark.parametrize("opset", [18, 21])
def test_opset_18_forms_split_num_outputs_and_pad_axes(opset):
    x = f32(2, 7, 3)
    ints = {"pads": np.array([1, 2, 0, 1], np.int64), "axes": np.array([2, -2], np.int64)}
    nodes = [
        node("Split", ["x"], ["s0", "s1", "s2"], axis=1, num_outputs=3),
        node("Pad", ["x", "pads", "", "axes"], ["pad"], mode="edge"),
        node("Pad", ["x", "pads", "value", "axes"], ["pad_value"]),
    ]
    inits = {**ints, "value": np.array(1.5, np.float32)}
    model = make(nodes, {"x": x}, ["s0", "s1", "s2", "pad", "pad_value"], inits, opset=opset)
    got = check_forward(model, {"x": x})
    assert [got[k].shape[1] for k in ("s0", "s1", "s2")] == [3, 3, 1]
    check_grads(model, {"x": x}, ["x"])


def test_depth_to_space_and_back():
    x = f32(2, 8, 3, 2)
    nodes = [
        node("DepthToSpace", ["x"], ["dcr"], blocksize=2),
        node("DepthToSpace", ["x"], ["crd"], blocksize=2, mode="CRD"),
        node("SpaceToDepth", ["dcr"], ["back"], blocksize=2),
    ]
    model = make(nodes, {"x": x}, ["dcr", "crd", "back"])
    got = check_forward(model, {"x": x})
    np.testing.assert_array_equal(got["back"], x)
    check_grads(model, {"x": x}, ["x"])


def test_shape_subgraphs_fold_to_a_single_reshape():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, ConstantOfShape, Range,
    Equal/Where on constants: all folded; one reshape and one add remain."""
    x = f32(2, 3, 4)
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        const("i0", np.array(0, np.int64)),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        const("zero_axis", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["n", "zero_axis"], ["n1"]),
        const("minus1", np.array([-1], np.int64)),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["fs"]),
        helper.make_node(
            "ConstantOfShape",
            ["fs"],
            ["ones"],
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
        const("start", np.array(0, np.int64)),
        const("limit", np.array(12, np.int64)),
        const("delta", np.array(1, np.int64)),
        helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
        const("six", np.array(6, np.int64)),
        helper.make_node("Less", ["r", "six"], ["m"]),
        const("zeros", np.zeros(12, np.float32)),
        helper.make_node("Where", ["m", "ones", "zeros"], ["mask"]),
        helper.make_node("Add", ["flat", "mask"], ["y"]),
    ]
    model = make(nodes, {"x": x}, ["y"])
    check_forward(model, {"x": x})
    assert spec_ops(model) == ["reshape", "constant", "add"]


def test_constant_folding_never_touches_parameters_batchnorm_or_dropout():
    w = f32(3)
    nodes = [
        node("Mul", ["w", "two"], ["w2"]),  # an initializer: stays a node
        node("Dropout", ["c", "ratio", "train"], ["d"]),
        node("BatchNormalization", ["c4", "one3", "zero3", "zero3", "one3"], ["bn"]),
        node("Add", ["w2", "d"], ["y"]),
    ]
    consts = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v, n))
        for n, v in {
            "two": np.array(2.0, np.float32),
            "c": np.ones(3, np.float32),
            "c4": np.ones((2, 3, 1, 1), np.float32),
            "ratio": np.array(0.5, np.float32),
            "train": np.array(True),
        }.items()
    ]
    model = make(
        consts + nodes,
        {},
        ["y", "bn"],
        {"w": w, "one3": np.ones(3, np.float32), "zero3": np.zeros(3, np.float32)},
    )
    ops = spec_ops(model)
    assert "mul" in ops and "dropout" in ops and "batch_norm" in ops


def test_slice_gather_with_computed_indices():
    x, ids = f32(5, 3), np.array([[4, 0], [1, 1]], np.int64)
    model = make([node("Gather", ["x", "ids"], ["y"])], {"x": x, "ids": ids}, ["y"])
    check_forward(model, {"x": x, "ids": ids})
    check_grads(model, {"x": x, "ids": ids}, ["x"])


# --- convolution, pooling, normalization, resize ------------------------------------------------
def test_conv_variants():
    x = f32(2, 4, 7, 6)
    nodes = [
        node("Conv", ["x", "w", "b3"], ["sym"], pads=[1, 1, 1, 1], strides=[2, 1]),
        node("Conv", ["x", "w"], ["asym"], pads=[0, 1, 2, 1], dilations=[2, 1]),
        node("Conv", ["x", "w"], ["same"], auto_pad="SAME_UPPER", strides=[2, 2]),
        node("Conv", ["x", "wg", "b6"], ["grouped"], group=2, pads=[1, 0, 1, 0]),
        node("Conv", ["x", "wd"], ["depthwise"], group=4, kernel_shape=[3, 3]),
    ]
    inits = {
        "w": f32(3, 4, 3, 3),
        "wg": f32(6, 2, 3, 2),
        "wd": f32(4, 1, 3, 3),
        "b3": f32(3),
        "b6": f32(6),
    }
    model = make(nodes, {"x": x}, [n.output[0] for n in nodes], inits)
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x", "w", "wg", "wd", "b3", "b6"], tol=1e-5)


def test_conv1d_conv_transpose_and_pools():
    x, x1 = f32(1, 2, 5, 4), f32(2, 3, 9)
    nodes = [
        node("ConvTranspose", ["x", "wt", "bt"], ["ct"], strides=[2, 2], output_padding=[1, 0]),
        node("ConvTranspose", ["x", "wt"], ["ct_pads"], strides=[2, 1], pads=[1, 0, 0, 1]),
        node("ConvTranspose", ["x", "wt"], ["ct_shape"], strides=[2, 2], output_shape=[10, 8]),
        node("ConvTranspose", ["x", "wg"], ["ct_groups"], group=2, dilations=[2, 1]),
        node("MaxPool", ["x"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        node("MaxPool", ["x"], ["mp_pads"], kernel_shape=[3, 3], pads=[1, 0, 2, 1]),
        node(
            "AveragePool",
            ["x"],
            ["ap"],
            kernel_shape=[3, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        node("AveragePool", ["x"], ["ap_ex"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("GlobalAveragePool", ["x"], ["gap"]),
        node("GlobalMaxPool", ["x"], ["gmp"]),
        node("Conv", ["x1", "w1", "b1"], ["conv1d"], pads=[1, 2], strides=[2]),
        node("MaxPool", ["x1"], ["mp1d"], kernel_shape=[3], strides=[2]),
    ]
    inits = {
        "wt": f32(2, 3, 3, 2),
        "bt": f32(3),
        "wg": f32(2, 2, 2, 3),
        "w1": f32(4, 3, 3),
        "b1": f32(4),
    }
    model = make(nodes, {"x": x, "x1": x1}, [n.output[0] for n in nodes], inits)
    check_forward(model, {"x": x, "x1": x1})
    check_grads(model, {"x": x, "x1": x1}, ["x", "wt", "wg", "w1"], tol=1e-5)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize(
    "attrs",
    [
        {"auto_pad": "SAME_UPPER", "kernel_shape": [3, 3], "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "kernel_shape": [3, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 2, 1], "ceil_mode": 1},
        {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [2, 0, 1, 2]},
    ],
)
def test_pool_padding_remat_cannot_place_natively(op, attrs):
    """Asymmetric, SAME, over-half-kernel and ceil-mode padding: explicit pads (and, for
    an average that excludes them, a per-window rescale)."""
    x = f32(1, 2, 5, 4)
    model = make([node(op, ["x"], ["y"], **attrs)], {"x": x}, ["y"])
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x"])


def test_max_pool_ties_follow_pytorch():
    torch = pytest.importorskip("torch")
    x = np.array([[[[1.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]]], np.float32)
    model = make(
        [node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[1, 1])], {"x": x}, ["y"]
    )
    imported = convert(model, dtype="float64")
    grad = ENGINE.run(
        RunRequest(
            imported.spec,
            {"x": x.astype(np.float64)},
            wrt=("x",),
            cotangents={"y": np.ones((1, 1, 2, 2))},
        )
    ).grads["x"]
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.max_pool2d(t, 2, 1).sum().backward()
    np.testing.assert_array_equal(grad, t.grad.numpy())


@pytest.mark.parametrize("opset", [13, 15, 21])
def test_batch_norm_training_mode_and_running_statistics(opset):
    x = f32(4, 3, 2, 2)
    stats = {"scale": f32(3), "bias": f32(3), "mean": f32(3), "var": f32(3, low=0.5, high=2)}
    training = {"training_mode": 1} if opset >= 14 else {}
    outputs = ["y", "running_mean", "running_var"] + (
        ["saved_mean", "saved_var"] if opset < 14 else []
    )
    nodes = [
        node(
            "BatchNormalization",
            ["x", "scale", "bias", "mean", "var"],
            outputs,
            momentum=0.8,
            epsilon=1e-3,
            **training,
        )
    ]
    model = make(nodes, {"x": x}, outputs[:3], stats, opset=opset)
    got = check_forward(model, {"x": x})
    np.testing.assert_allclose(got["y"].mean(axis=(0, 2, 3)), stats["bias"], atol=1e-5)
    check_grads(model, {"x": x}, ["x", "scale", "bias"])
    inference = make(
        [node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])],
        {"x": x},
        ["y"],
        stats,
        opset=opset,
    )
    check_forward(inference, {"x": x})


def test_layer_and_instance_normalization():
    x = f32(2, 3, 4)
    nodes = [
        node(
            "LayerNormalization", ["x", "s", "b"], ["ln", "mean", "inv_std"], axis=1, epsilon=1e-3
        ),
        node("LayerNormalization", ["x", "s4"], ["ln_nobias"]),
        node("InstanceNormalization", ["x", "s3", "b3"], ["inst"], epsilon=1e-4),
    ]
    inits = {"s": f32(3, 4), "b": f32(1, 4), "s4": f32(4), "s3": f32(3), "b3": f32(3)}
    model = make(nodes, {"x": x}, ["ln", "mean", "inv_std", "ln_nobias", "inst"], inits)
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x", "s", "b", "s3"])


def test_dropout_training_mode_drops_with_a_node_seed():
    x = f32(50, 40, low=1.0, high=2.0)
    nodes = [
        node("Dropout", ["x", "ratio", "train"], ["y", "mask"]),
        node("Dropout", ["x", "ratio"], ["eval"]),  # training_mode absent: identity
    ]
    inits = {"ratio": np.array(0.25, np.float32), "train": np.array(True)}
    consts = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k))
        for k, v in inits.items()
    ]
    model = make(consts + nodes, {"x": x}, {"y": T.FLOAT, "mask": T.BOOL, "eval": T.FLOAT})
    got = remat_outputs(model, {"x": x})
    y, mask = got["y"], got["mask"]
    assert 0.15 < 1 - mask.mean() < 0.35
    np.testing.assert_allclose(y, np.where(mask, x / 0.75, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(got["eval"], x)
    np.testing.assert_array_equal(remat_outputs(model, {"x": x})["y"], y)  # deterministic
    dropout = next(n for n in convert(model).spec.nodes if n.op == "dropout")
    assert dropout.attrs["p"] == 0.25 and dropout.attrs["key"] == "y"


@pytest.mark.parametrize(
    "attrs, scales, sizes",
    [
        (
            {
                "mode": "nearest",
                "coordinate_transformation_mode": "asymmetric",
                "nearest_mode": "floor",
            },
            [1, 1, 2, 3],
            None,
        ),
        ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, None, [2, 3, 7, 5]),
        (
            {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
            [1, 1, 2, 2],
            None,
        ),
        ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 6, 9]),
    ],
)
def test_resize(attrs, scales, sizes):
    x = f32(2, 3, 3, 4)
    inits = {"roi": np.zeros(0, np.float32)}
    if scales:
        inits["scales"] = np.array(scales, np.float32)
        inputs = ["x", "roi", "scales"]
    else:
        inits["scales"], inits["sizes"] = np.zeros(0, np.float32), np.array(sizes, np.int64)
        inputs = ["x", "roi", "scales", "sizes"]
    model = make([node("Resize", inputs, ["y"], **attrs)], {"x": x}, ["y"], inits)
    check_forward(model, {"x": x})
    check_grads(model, {"x": x}, ["x"])


# --- names, dtypes, the SDK ----------------------------------------------------------------------
def test_names_are_kept_and_initializers_are_inputs():
    x = f32(2, 3)
    names = {"w": "layer.0/weight:0", "x": "input ids", "y": "out/logits"}
    model = make(
        [
            helper.make_node("MatMul", [names["x"], names["w"]], ["h"]),
            helper.make_node("Relu", ["h"], [names["y"]]),
        ],
        {names["x"]: x},
        [names["y"]],
        {names["w"]: f32(3, 4)},
    )
    imported = convert(model)
    assert [i.name for i in imported.spec.inputs] == [names["x"], names["w"]]
    assert imported.spec.outputs == ((names["y"], names["y"]),)
    assert list(imported.params) == [names["w"]]
    assert [n.name for n in imported.spec.nodes] == ["h", names["y"]]


def test_dtype_float64_casts_initializers_inputs_and_constants():
    x = f32(2, 3)
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0), "c")
        ),
        node("Mul", ["x", "c"], ["m"]),
        node("Cast", ["m"], ["y"], to=T.FLOAT),
        node("Add", ["y", "w"], ["z"]),
    ]
    model = make(nodes, {"x": x}, ["z"], {"w": f32(3).astype(np.float16)})
    with pytest.raises(OnnxImportError, match="float16"):
        convert(model)
    imported = convert(model, dtype="float64")
    assert imported.params["w"].dtype == np.float64
    assert {i.dtype for i in imported.spec.inputs} == {"float64"}
    out = ENGINE.run(RunRequest(imported.spec, {"x": x.astype(np.float64), **imported.params}))
    expected = x.astype(np.float64) * 2 + imported.params["w"]
    np.testing.assert_allclose(out.outputs["z"], expected, rtol=1e-15)


def test_from_onnx_path_bytes_and_proto(tmp_path):
    x = f32(2, 3)
    model = make([node("MatMul", ["x", "w"], ["y"])], {"x": x}, ["y"], {"w": f32(3, 2)})
    path = tmp_path / "model.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    results = []
    for source in (str(path), path.read_bytes(), onnx.load(path, load_external_data=False)):
        kwargs = {} if isinstance(source, str) else {"base_dir": tmp_path}
        graph, params = remat.from_onnx(source, **kwargs)
        assert isinstance(graph, remat.Graph) and graph.output_names == ["y"]
        results.append(params["w"])
    with remat.Client.in_process() as client:
        out = client.run(graph, {"x": x, **params}).outputs["y"]
    np.testing.assert_allclose(out, x @ results[0], rtol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_dynamic_input_dimensions_need_input_shapes():
    model = make([node("Relu", ["x"], ["y"])], {"x": f32(2, 3)}, ["y"])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(OnnxImportError, match="graph input 'x'.*batch.*input_shapes"):
        convert(model)
    assert convert(model, input_shapes={"x": (5, 3)}).spec.inputs[0].shape == (5, 3)


# --- the model zoo, exported by torch's legacy exporter in training mode ---------------------
ZOO = zoo_onnx.ZOO
OPSET = zoo_onnx.OPSET


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    return zoo_onnx.Exports(tmp_path_factory.mktemp("onnx_zoo"))


def _feeds(name: str, dtype) -> dict[str, np.ndarray]:
    zoo = pytest.importorskip("zoo")
    return {k: v.numpy() for k, v in zoo.inputs(name, dtype).items()}


@pytest.mark.parametrize(
    "name, opset",
    [(name, OPSET) for name in ZOO] + [("resnet", 13), ("unet", 21), ("gpt2", 14), ("bert", 21)],
)
def test_zoo_forward_matches_onnxruntime(name, opset, exported):
    """(SDPA exports from opset 14 on; opset 13 has BatchNormalization-9.)"""
    torch = pytest.importorskip("torch")
    path = exported(name, opset=opset)
    feeds = _feeds(name, torch.float32)
    graph, params = remat.from_onnx(path)
    assert all(n.attrs["training"] for n in graph.nodes if n.op == "batch_norm")
    model = onnx.load(path)
    expected = ort_outputs(model, {i.name: feeds[i.name] for i in model.graph.input})
    inputs = {k: v for k, v in feeds.items() if k in graph}
    got = ENGINE.run(RunRequest(graph.spec(), {**inputs, **params})).outputs
    for out, value in expected.items():
        np.testing.assert_allclose(got[out], value, rtol=1e-4, atol=1e-5, err_msg=out)


def _torch_outputs(out) -> list:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compare_with_torch(name: str, path, tol: float) -> None:
    """Outputs and the gradients of sum(output * R) w.r.t. every parameter, against
    torch.autograd on the float64 module: max |diff| / max |reference| <= tol."""
    torch = pytest.importorskip("torch")
    zoo = pytest.importorskip("zoo")
    graph, params = remat.from_onnx(path, dtype="float64")
    module, args, kwargs = zoo.MODELS[name](torch.float64)
    torch_params = dict(module.named_parameters())
    # The exporter names initializers after the parameters (and buffers) they hold.
    assert set(torch_params) <= set(params), sorted(set(torch_params) - set(params))
    outputs = _torch_outputs(module(*args, **kwargs))
    assert len(outputs) == len(graph.output_names)
    rng = np.random.default_rng(5)
    weights = {
        out: rng.uniform(-1.0, 1.0, tuple(value.shape))
        for out, value in zip(graph.output_names, outputs)
    }
    loss = sum(
        (value * torch.from_numpy(weights[out])).sum()
        for out, value in zip(graph.output_names, outputs)
    )
    loss.backward()
    inputs = {k: v for k, v in _feeds(name, torch.float64).items() if k in graph}
    result = ENGINE.run(
        RunRequest(graph.spec(), {**inputs, **params}, wrt=tuple(torch_params), cotangents=weights)
    )
    for out, value in zip(graph.output_names, outputs):
        reference = value.detach().numpy()
        error = float(np.abs(result.outputs[out] - reference).max() / np.abs(reference).max())
        assert error < tol, f"{name}: output {out}: relative error {error:.3g}"
    # Some gradients are ~0 by construction (a conv bias before a training-mode
    # BatchNorm): measure them against the model's largest gradient.
    floor = 1e-3 * max(float(np.abs(p.grad.numpy()).max()) for p in torch_params.values())
    # ONNX's Gather has no padding_idx: torch's nn.Embedding gives its row no gradient.
    padding_rows = {
        f"{prefix}.weight": child.padding_idx
        for prefix, child in module.named_modules()
        if isinstance(child, torch.nn.Embedding) and child.padding_idx is not None
    }
    for key, parameter in torch_params.items():
        reference = parameter.grad.numpy()
        if key in padding_rows:
            result.grads[key][padding_rows[key]] = 0.0
        scale = max(float(np.abs(reference).max()), floor)
        error = float(np.abs(result.grads[key] - reference).max()) / scale
        assert error < tol, f"{name}: gradient of {key}: relative error {error:.3g}"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_gradients_match_torch_autograd_in_float64(name, exported):
    _compare_with_torch(name, exported(name, "float64"), tol=1e-9)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_float32_export_imported_in_float64(name, exported):
    """dtype="float64" on the float32 file: only its float32-rounded constants
    (GELU's coefficients, BatchNorm's epsilon) separate it from torch's float64."""
    _compare_with_torch(name, exported(name), tol=1e-7)


# --- fusions -----------------------------------------------------------------------------------
def gelu_formula(swap: bool = False, half: float = 0.5, leak: str | None = None, init=False):
    """GPT-2's GELU as its ONNX export writes it (x -> y), constants second (`swap`:
    first); `leak` names an intermediate also made a graph output; `init`: the 0.5 is
    an initializer, not a Constant node."""
    constants = {"c_half": half, "c_three": 3.0, "c_cubic": 0.044715, "c_scale": 0.7978846}
    constants["c_one"] = 1.0
    nodes = [
        node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
        for name, v in constants.items()
        if not (init and name == "c_half")
    ]

    def binary(op, a, b, out):
        return node(op, [b, a] if swap else [a, b], [out])

    nodes += [
        binary("Mul", "x", "c_half", "half"),
        node("Pow", ["x", "c_three"], ["cube"]),
        binary("Mul", "cube", "c_cubic", "cubic"),
        binary("Add", "x", "cubic", "inner"),
        binary("Mul", "inner", "c_scale", "scaled"),
        node("Tanh", ["scaled"], ["t"]),
        binary("Add", "t", "c_one", "one_plus"),
        binary("Mul", "half", "one_plus", "y"),
    ]
    inits = {"c_half": np.array(half, np.float32)} if init else None
    return make(nodes, {"x": f32(3, 5)}, ["y", *([leak] if leak else [])], inits)


@pytest.mark.parametrize("swap", [False, True])
def test_the_gelu_formula_is_one_gelu_op(swap):
    """Its backward would read four values of x's size; remat's gelu reads x alone."""
    model = gelu_formula(swap)
    assert spec_ops(model) == ["gelu"]
    feeds = {"x": f32(3, 5, low=-4.0, high=4.0)}
    got = check_forward(model, feeds, rtol=1e-6, atol=1e-6)
    assert list(got) == ["y"]
    check_grads(model, feeds, ["x"])


@pytest.mark.parametrize(
    "variant",
    [
        {"leak": "t"},  # an intermediate is an output: it must be computed
        {"half": 0.6},  # not the formula
        {"init": True},  # a parameter, not a constant: the caller may change it
    ],
    ids=["intermediate_output", "other_constant", "initializer_constant"],
)
def test_no_fusion_where_the_formula_is_not_exactly_there(variant):
    model = gelu_formula(**variant)
    ops = spec_ops(model)
    assert "gelu" not in ops and "tanh" in ops
    check_forward(model, {"x": f32(3, 5)}, rtol=1e-6, atol=1e-6)


def affine_model(bias_shape=(4,), first="product", leak=False, reader=False):
    """x (2, 3, 5) @ w (5, 4) + b: MatMul then Add (`first`: which operand the product
    is); `leak`: the product is also a graph output; `reader`: another node reads it."""
    nodes = [node("MatMul", ["x", "w"], ["p"])]
    nodes.append(node("Add", ["p", "b"] if first == "product" else ["b", "p"], ["y"]))
    outputs = ["y"]
    if reader:
        nodes.append(node("Relu", ["p"], ["r"]))
        outputs.append("r")
    if leak:
        outputs.append("p")
    inits = {"w": f32(5, 4), "b": f32(*bias_shape)}
    return make(nodes, {"x": f32(2, 3, 5)}, outputs, inits)


@pytest.mark.parametrize(
    "variant, ops",
    [
        ({}, ["linear"]),
        ({"first": "bias"}, ["linear"]),
        ({"bias_shape": (3, 1)}, ["linear"]),
        ({"bias_shape": (2, 1, 1, 4)}, ["matmul", "add"]),  # the bias widens the product
        ({"leak": True}, ["matmul", "add"]),  # the product is an output
        ({"reader": True}, ["matmul", "add", "relu"]),  # and read elsewhere
    ],
    ids=["product_first", "bias_first", "column_bias", "wider_bias", "output", "read_twice"],
)
def test_matmul_then_add_is_one_linear_op(variant, ops):
    """One buffer where the pair holds the product and the sum at once; only where
    nothing else needs the product."""
    model = affine_model(**variant)
    assert spec_ops(model) == ops
    feeds = {"x": f32(2, 3, 5)}
    check_forward(model, feeds)
    check_grads(model, feeds, ["x", "w", "b"])


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gemm_with_a_bias_is_one_linear_op(beta):
    model = make(
        [node("Gemm", ["x", "w", "c"], ["y"], transB=1, beta=beta)],
        {"x": f32(3, 5)},
        ["y"],
        {"w": f32(4, 5), "c": f32(4)},
    )
    assert spec_ops(model)[-1] == "linear"
    check_forward(model, {"x": f32(3, 5)})
    check_grads(model, {"x": f32(3, 5)}, ["x", "w", "c"])
