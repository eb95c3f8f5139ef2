"""The ONNX importer treats a model as a program from a stranger: every limit is checked
before the work it bounds, nothing from the model runs, external data never leaves its
base directory, and one error lists everything unsupported."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from support import HANG_SECONDS

from remat_proto.onnx_import import OnnxImportError, OnnxLimits, convert


def model(nodes, inputs=None, outputs=("y",), inits=(), opset=17, **kwargs):
    inputs = inputs or {"x": (2, 3)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, T.FLOAT, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


RELU = [helper.make_node("Relu", ["x"], ["y"], name="relu")]


def raises(match, source, **kwargs):
    with pytest.raises(OnnxImportError, match=match) as info:
        convert(source, **kwargs)
    return str(info.value)


# --- sizes, counts, opsets, domains ---------------------------------------------------------
def test_model_bytes_are_checked_before_parsing():
    raises(
        "model: 1000 bytes, over the limit of 100 .*max_model_bytes",
        b"\xff" * 1000,
        limits=OnnxLimits(max_model_bytes=100),
    )
    raises("over the limit of 10 ", model(RELU), limits=OnnxLimits(max_model_bytes=10))
    raises("not a valid ONNX model", b"\xff" * 1000)


def test_node_count_opset_and_domains():
    many = [helper.make_node("Relu", ["x"], [f"r{i}"]) for i in range(20)] + RELU
    raises(
        "21 nodes, over the limit of 20 .*max_nodes", model(many), limits=OnnxLimits(max_nodes=20)
    )
    raises("opset 12 is not supported .*13 to 21", model(RELU, opset=12))
    raises("opset 22 is not supported", model(RELU, opset=22))
    bare = model(RELU)
    del bare.opset_import[:]
    raises("opset_import: the model imports no default", bare)
    custom = [helper.make_node("Gelu", ["x"], ["y"], name="fused", domain="com.microsoft")]
    raises("node 'fused' \\(Gelu\\): custom domain 'com.microsoft'", model(custom))


def test_functions_and_control_flow_subgraphs_are_rejected():
    function = helper.make_function(
        "local",
        "f",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    call = [helper.make_node("f", ["x"], ["y"], domain="local")]
    with_function = model(call, functions=[function])
    raises("model.functions: 1 model-local functions", with_function)
    branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", T.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch),
        helper.make_node("Loop", ["", "cond"], ["z"], name="loop", body=branch),
    ]
    text = raises("cannot import", model(nodes, outputs=("y", "z"), inits=[cond]))
    assert "node 'if' (If): attribute 'then_branch' holds a subgraph" in text
    assert "node 'loop' (Loop): attribute 'body' holds a subgraph" in text


def test_every_unsupported_op_and_attribute_value_in_one_error():
    roi, scales = np.zeros(0, np.float32), np.array([1, 1, 2, 2], np.float32)
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["top", "idx"], name="topk"),
        helper.make_node("Relu", ["top"], ["after"], name="after_topk"),  # no cascade error
        helper.make_node("Einsum", ["x", "x"], ["e"], name="einsum", equation="ij,ij->i"),
        helper.make_node("Resize", ["img", "roi", "scales"], ["r"], name="resize", mode="cubic"),
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="wrap"),
        helper.make_node("Floor", ["x"], ["s"], name="floor"),
        helper.make_node("MaxPool", ["img"], ["m", "argmax"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("Identity", ["argmax"], ["y"], name="uses_indices"),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in {
            "k": np.array([1], np.int64),
            "roi": roi,
            "scales": scales,
            "pads": np.zeros(4, np.int64),
        }.items()
    ]
    m = model(nodes, {"x": (2, 3), "img": (1, 1, 4, 4)}, ("after", "e", "r", "p", "s", "y"), inits)
    text = raises("cannot import the ONNX model: 6 unsupported", m)
    for expected in (
        "node 'topk' (TopK): op type 'TopK' is not supported",
        "node 'einsum' (Einsum): op type 'Einsum'",
        "node 'resize' (Resize): unsupported mode 'cubic'",
        "node 'pad' (Pad): unsupported mode 'wrap'",
        "node 'floor' (Floor): unsupported Floor is supported on constants only",
        "node 'uses_indices' (Identity): uses 'argmax': MaxPool's Indices output",
    ):
        assert expected in text, text
    assert "after_topk" not in text


def test_a_huge_list_of_problems_is_summarized():
    nodes = [helper.make_node("TopK", ["x", "k"], [f"t{i}", f"i{i}"]) for i in range(600)]
    nodes.append(helper.make_node("Relu", ["x"], ["y"]))
    k = numpy_helper.from_array(np.array([1], np.int64), "k")
    text = raises("600 unsupported", model(nodes, inits=[k]))
    assert text.endswith("... and 100 more (TopK x100)") and len(text) < 100_000


# --- folding and tensors: sizes checked before anything is allocated ----------------------------
def _empty(name, dims):
    """A float tensor with dims and no data."""
    tensor = onnx.TensorProto(name=name, data_type=T.FLOAT)
    tensor.dims.extend(dims)
    return tensor


def _constant(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


@pytest.mark.parametrize(
    "nodes",
    [
        [
            _constant("s", np.array([1 << 20, 1 << 20], np.int64)),
            helper.make_node("ConstantOfShape", ["s"], ["y"], name="huge"),
        ],
        [
            _constant("c", np.ones(4, np.float32)),
            _constant("s", np.array([1 << 30, 4], np.int64)),
            helper.make_node("Expand", ["c", "s"], ["y"], name="huge"),
        ],
        [
            _constant("c", np.ones(4, np.float32)),
            _constant("r", np.array([1 << 40], np.int64)),
            helper.make_node("Tile", ["c", "r"], ["y"], name="huge"),
        ],
        [
            _constant("a", np.array(0, np.int64)),
            _constant("b", np.array(1 << 50, np.int64)),
            _constant("d", np.array(1, np.int64)),
            helper.make_node("Range", ["a", "b", "d"], ["y"], name="huge"),
        ],
    ],
)
def test_folded_tensors_are_size_checked_before_allocation(nodes):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        raises("node 'huge' .* more than 16777216 elements .*max_folded_elements", model(nodes))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20 and time.perf_counter() - start < HANG_SECONDS


def test_tensor_sizes_are_checked_before_reading():
    empty_huge = _empty("w", [1 << 40])
    raises("initializers: more than .*max_initializer_bytes", model(RELU, inits=[empty_huge]))
    raises(
        "more than 100 bytes in total",
        model(RELU, inits=[numpy_helper.from_array(np.zeros(30, np.float32), "w")]),
        limits=OnnxLimits(max_initializer_bytes=100),
    )
    constant = helper.make_node("Constant", [], ["y"], value=_empty("c", [1 << 40]))
    raises("attribute 'value': shape .* more than", model([constant]))
    short = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    short.raw_data = short.raw_data[:-1]
    raises("initializer 'w': 11 bytes of data, 12 expected", model(RELU, inits=[short]))
    strings = helper.make_tensor("w", T.STRING, [1], [b"x"])
    raises("initializer 'w': element type string is not supported", model(RELU, inits=[strings]))


def test_input_dtype_and_argument_checks():
    raises("dtype: must be None", model(RELU), dtype="float16")
    with pytest.raises(TypeError):
        convert("model.onnx")


# --- external data ----------------------------------------------------------------------------
def _external(tmp_path, location, offset=None, length=None, data=None):
    """A model whose initializer 'w' (3 floats) lives at `location`."""
    data = np.arange(3, dtype=np.float32).tobytes() if data is None else data
    target = tmp_path / "weights.bin"
    target.write_bytes(data)
    tensor = _empty("w", [3])
    tensor.data_location = T.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    add = helper.make_node("Add", ["x", "w"], ["y"])
    return model([add], {"x": (3,)}, inits=[tensor])


def test_external_data_inside_the_base_directory(tmp_path):
    imported = convert(_external(tmp_path, "weights.bin"), base_dir=tmp_path)
    np.testing.assert_array_equal(imported.params["w"], [0, 1, 2])
    (tmp_path / "sub").mkdir()
    os.replace(tmp_path / "weights.bin", tmp_path / "sub" / "w.bin")
    data = np.arange(5, dtype=np.float32).tobytes()
    (tmp_path / "sub" / "w.bin").write_bytes(data)
    m = _external(tmp_path, "sub/../sub/w.bin", offset=8, length=12, data=data)
    (tmp_path / "sub" / "w.bin").write_bytes(data)
    np.testing.assert_array_equal(convert(m, base_dir=tmp_path).params["w"], [2, 3, 4])


def test_external_data_never_escapes_its_base_directory(tmp_path):
    base = tmp_path / "model"
    base.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.zeros(3, np.float32).tobytes())
    raises(
        "initializer 'w': external data location '../secret.bin' escapes",
        _external(base, "../secret.bin"),
        base_dir=base,
    )
    absolute = str(tmp_path / "secret.bin")
    raises("is absolute", _external(base, absolute), base_dir=base)
    os.symlink(tmp_path / "secret.bin", base / "link.bin")
    raises("'link.bin' escapes the base directory", _external(base, "link.bin"), base_dir=base)
    (base / "dir").mkdir()
    raises("not a regular file", _external(base, "dir"), base_dir=base)
    raises(
        "external data is not allowed",
        _external(base, "weights.bin"),
        base_dir=base,
        allow_external_data=False,
    )
    raises("give the base directory", _external(base, "weights.bin").SerializeToString())
    raises(
        "offset 8 \\+ length 12 is past the end of its file \\(12 bytes\\)",
        _external(base, "weights.bin", offset=8, length=12),
        base_dir=base,
    )
    raises(
        "length 8 does not match the 12 bytes",
        _external(base, "weights.bin", length=8),
        base_dir=base,
    )
    raises(
        "offset '-4' is not a natural number",
        _external(base, "weights.bin", offset=-4),
        base_dir=base,
    )
    raises("cannot open", _external(base, "missing.bin"), base_dir=base)


def test_the_server_route_refuses_external_data_even_in_constants(tmp_path):
    tensor = _empty("c", [3])
    tensor.data_location = T.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    constant = helper.make_node("Constant", [], ["y"], name="leak", value=tensor)
    raises(
        "node 'leak' \\(Constant\\): attribute 'value': external data is not allowed",
        model([constant]).SerializeToString(),
        allow_external_data=False,
    )
    raises("is absolute", model([constant]), base_dir=tmp_path)
