"""Structurally valid protos with hostile content get a clear answer.

* hostile graphs: random op names, wrong arity, dangling, self and cyclic references,
  duplicate and empty names, huge, negative and zero dimensions, rank over the limit,
  shapes whose element count overflows int64, attributes of any type and value,
  unknown dtypes, tensors whose bytes do not match their shape; sent to every RPC
  with hostile wrt, loss, fetch, cotangents, input shapes and policies.
* op templates: every registered op on inputs that fit it, with hostile attributes
  (stride 0, p = 1, NaN exponents, axes out of range...), so requests get past
  decoding into shape rules, the executor, VJP rules and a second differentiation.
* policies: a valid graph under policies with out-of-range parameters.
* graph references: registering and running by id, with unknown, empty and evicted
  ids in between; a valid registered graph always runs correctly.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from remat.v1 import executor_pb2, graph_pb2, tensor_pb2
from remat_server.ops import REGISTRY

from fuzz_support import (EDGE_INTS, NUMPY, OP_NAMES, Checkpointed, Tally, W, X, array_of,
                          check_answer, feeds_for, fuzz_settings, hostile_attrs,
                          hostile_floats, hostile_graphs, hostile_policies, hostile_tensors,
                          inp, mlp_graph, names, node, requests_for, tensor)

F32, F64, I64, BOOL = tensor_pb2.FLOAT32, tensor_pb2.FLOAT64, tensor_pb2.INT64, tensor_pb2.BOOL


def _rpc(stub, name):
    return getattr(stub, name)


@pytest.mark.parametrize("rpcs", [("Run",), ("Plan", "Differentiate", "RegisterGraph")],
                         ids=["run", "plan-differentiate-register"])
def test_hostile_graphs_get_a_clear_status(rpcs, fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("hostile_graphs")
    @given(data=st.data())
    def fuzz(data):
        message = data.draw(hostile_graphs(), label="graph")
        rpc = data.draw(st.sampled_from(rpcs), label="rpc")
        request = data.draw(requests_for(message, rpc), label="request")
        tally.add(check_answer(_rpc(fuzz_stub, rpc), request, what=f"{rpc} {request}"))
        check.tick()

    fuzz()
    print(rpcs, tally.codes)


# --- every op with hostile attributes -----------------------------------------------------
# Inputs every op template draws from: one of each kind the ops take.
POOL = {
    "x": ([2, 3], F64), "v": ([3], F64), "f": ([2, 3], F32), "s": ([], F64),
    "i": ([2], I64), "j": ([2, 3], I64), "c": ([2, 3], BOOL),
    "img": ([1, 2, 5, 5], F64), "k": ([3, 2, 2, 2], F64), "cols": ([1, 8, 16], F64),
}
# Inputs that fit an op (else any from the pool, in the op's arity).
FITS = {
    "matmul": ["x", "v"], "where": ["c", "x", "v"], "layer_norm": ["x", "v", "v"],
    "cross_entropy": ["x", "i"], "take": ["x", "i"], "take_along_axis": ["x", "j"],
    "scatter_add": ["x", "i"], "scatter_add_along_axis": ["x", "j"], "one_hot": ["i"],
    "conv2d": ["img", "k"], "max_pool2d": ["img"], "avg_pool2d": ["img"], "unfold": ["img"],
    "fold": ["cols"], "constant": [], "cast": ["x"],
}
# Attribute values that are valid somewhere, or just past a boundary.
INTERESTING = {
    "int": st.one_of(st.integers(-6, 6), st.sampled_from(EDGE_INTS)),
    "ints": st.one_of(st.lists(st.integers(-3, 6), max_size=5),
                      st.lists(st.sampled_from(EDGE_INTS), max_size=3)),
    "float": hostile_floats,
    "floats": st.lists(hostile_floats, max_size=3),
    "string": st.sampled_from(["float32", "float64", "int32", "int64", "bool", "float16", "",
                               "key"]),
    "bool": st.booleans(),
    "tensor": hostile_tensors(),
}


@st.composite
def op_requests(draw):
    op_name = draw(st.sampled_from(OP_NAMES), label="op")
    op = REGISTRY[op_name]
    if op_name in FITS and draw(st.integers(0, 4)):
        chosen = FITS[op_name]
    else:
        count = op.min_inputs if op.max_inputs >= 0 else draw(st.integers(op.min_inputs, 3))
        chosen = draw(st.lists(st.sampled_from(sorted(POOL)), min_size=count, max_size=count))
    message = graph_pb2.NodeDef(name="n", op=op_name, inputs=chosen, source="fuzz.py:1")
    for attr_name, attr in op.attrs.items():
        present = attr.required or draw(st.booleans())
        if present and draw(st.integers(0, 9)):
            value = draw(INTERESTING[attr.type].map(lambda v, t=attr.type: _attr(t, v)))
        elif present:
            value = draw(hostile_attrs(attr.type))
        else:
            continue
        message.attrs[attr_name].CopyFrom(value)
    used = sorted(set(chosen))
    nodes, outputs = [message], [graph_pb2.OutputDef(name="out", node="n")]
    floats = [name for name in used if POOL[name][1] in (F32, F64)]
    wrt, loss = [], ""
    if floats and draw(st.integers(0, 3)):
        # loss = sum(n) in float64 (a cast first, so any output dtype can be summed)
        nodes += [node("n64", "cast", ["n"], dtype=graph_pb2.AttrValue(s="float64")),
                  node("l", "sum", ["n64"])]
        outputs.append(graph_pb2.OutputDef(name="loss", node="l"))
        wrt = draw(st.lists(st.sampled_from(floats), min_size=1, unique=True))
        loss = "loss"
    message = graph_pb2.Graph(name=op_name, inputs=[inp(n, *POOL[n]) for n in used],
                              nodes=nodes, outputs=outputs)
    return message, wrt, loss


def _attr(kind: str, value) -> graph_pb2.AttrValue:
    if kind == "int":
        return graph_pb2.AttrValue(i=value)
    if kind == "ints":
        return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=value))
    if kind == "float":
        return graph_pb2.AttrValue(f=value)
    if kind == "floats":
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=value))
    if kind == "string":
        return graph_pb2.AttrValue(s=value)
    if kind == "bool":
        return graph_pb2.AttrValue(b=value)
    return graph_pb2.AttrValue(tensor=value)


@st.composite
def fitting_tensors(draw, item: graph_pb2.InputDef) -> tensor_pb2.Tensor:
    """A tensor of the declared shape and dtype, with edge values (NaN, Inf, indices
    out of range...)."""
    dtype = NUMPY[item.dtype]
    if dtype.kind == "f":
        values = draw(st.lists(st.floats(-3, 3) if draw(st.integers(0, 4)) else hostile_floats,
                               min_size=1, max_size=6))
    elif dtype.kind == "b":
        values = draw(st.lists(st.booleans(), min_size=1, max_size=6))
    else:
        values = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(-4, 6)), min_size=1,
                               max_size=6))
    return tensor(np.resize(np.array(values, dtype), tuple(item.shape)))


@st.composite
def honest_feeds(draw, message: graph_pb2.Graph, request) -> None:
    """Mostly fitting tensors for every input; one in twenty lies about itself."""
    for item in message.inputs:
        value = draw(fitting_tensors(item) if draw(st.integers(0, 19)) else
                     hostile_tensors(list(item.shape), item.dtype))
        request.inputs[item.name].CopyFrom(value)


def test_every_op_with_hostile_attributes(fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("op_templates")
    @given(data=st.data())
    def fuzz(data):
        message, wrt, loss = data.draw(op_requests(), label="graph")
        rpc = data.draw(st.sampled_from(["Run", "Run", "Run", "Plan", "Differentiate"]),
                        label="rpc")
        ref = executor_pb2.GraphRef(graph=message)
        if rpc == "Run":
            request = executor_pb2.RunRequest(graph=ref, wrt=wrt, loss=loss)
            data.draw(honest_feeds(message, request), label="feeds")
        elif rpc == "Plan":
            request = executor_pb2.PlanRequest(graph=ref, wrt=wrt, loss=loss,
                                               policy=data.draw(hostile_policies()))
        else:
            request = executor_pb2.DifferentiateRequest(graph=ref, wrt=wrt, loss=loss)
        outcome = check_answer(_rpc(fuzz_stub, rpc), request, what=f"{rpc} {request}")
        tally.add(outcome)
        if rpc == "Differentiate" and outcome.code is grpc.StatusCode.OK:
            # Differentiate the joint graph again (a VJP of the VJP, cotangent mode).
            again = executor_pb2.DifferentiateRequest(
                graph=executor_pb2.GraphRef(graph=outcome.response.graph), wrt=wrt)
            tally.add(check_answer(fuzz_stub.Differentiate, again, what=f"again {again}"))
        check.tick()

    fuzz()
    print(tally.codes)


# --- policies --------------------------------------------------------------------------
def _mlp_run(policy) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph=mlp_graph()),
                                      wrt=["x", "w"], loss="loss", policy=policy)
    request.inputs["x"].CopyFrom(tensor(X))
    request.inputs["w"].CopyFrom(tensor(W))
    return request


def test_policies_with_hostile_parameters(fuzz_stub):
    """Any policy either runs and gives store_all's numbers, or is refused clearly."""
    tally, check = Tally(), Checkpointed(fuzz_stub)
    h = X @ W

    @fuzz_settings("policies")
    @given(policy=hostile_policies(), rpc=st.sampled_from(["Run", "Plan", "Compare"]))
    def fuzz(policy, rpc):
        if rpc == "Plan":
            request = executor_pb2.PlanRequest(graph=executor_pb2.GraphRef(graph=mlp_graph()),
                                               wrt=["x"], loss="loss", policy=policy)
            tally.add(check_answer(fuzz_stub.Plan, request, what=f"Plan {policy}"))
        elif rpc == "Compare":
            request = executor_pb2.CompareRequest(run=_mlp_run(None), policies=[policy])
            outcome = check_answer(fuzz_stub.Compare, request, stream=True,
                                   what=f"Compare {policy}")
            tally.add(outcome)
            for result in outcome.response or ():
                assert result.error or result.max_grad_diff == 0.0, result
                if result.error:
                    assert result.error_code not in ("INTERNAL", "UNKNOWN", ""), result
        else:
            outcome = check_answer(fuzz_stub.Run, _mlp_run(policy), what=f"Run {policy}")
            tally.add(outcome)
            if outcome.code is grpc.StatusCode.OK:  # every schedule: the same numbers
                grads = outcome.response.grads
                np.testing.assert_array_equal(array_of(grads["x"]), 2 * h @ W.T)
                np.testing.assert_allclose(array_of(grads["w"]), X.T @ (2 * h), rtol=1e-12)
        check.tick()

    fuzz()
    print(tally.codes)


# --- graph references ------------------------------------------------------------------
def test_graph_references_register_run_and_evict(fuzz_stub):
    """Hostile registrations and ids between valid ones: a valid graph registered just
    before its Run always runs correctly; an id that was never (or is no longer)
    registered gives NOT_FOUND naming it; an empty id gives INVALID_ARGUMENT."""
    tally, check = Tally(), Checkpointed(fuzz_stub)
    valid_id = fuzz_stub.RegisterGraph(
        executor_pb2.RegisterGraphRequest(graph=mlp_graph()), timeout=10).graph_id

    @fuzz_settings("graph_refs")
    @given(data=st.data())
    def fuzz(data):
        action = data.draw(st.sampled_from(["register", "register", "unknown", "empty", "valid"]))
        if action == "register":
            message = data.draw(hostile_graphs())
            outcome = check_answer(fuzz_stub.RegisterGraph,
                                   executor_pb2.RegisterGraphRequest(graph=message),
                                   what=f"RegisterGraph {message}")
            tally.add(outcome)
            if outcome.code is grpc.StatusCode.OK:
                request = executor_pb2.RunRequest(
                    graph=executor_pb2.GraphRef(graph_id=outcome.response.graph_id))
                data.draw(feeds_for(message, request))
                tally.add(check_answer(fuzz_stub.Run, request, what=f"Run by id {message}"))
        elif action in ("unknown", "empty"):
            graph_id = "" if action == "empty" else data.draw(st.one_of(
                st.text(min_size=1, max_size=70), st.sampled_from(["0" * 64, valid_id[::-1]])))
            request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph_id=graph_id))
            outcome = check_answer(fuzz_stub.Run, request, what=f"Run id {graph_id!r}")
            tally.add(outcome)
            expected = (grpc.StatusCode.INVALID_ARGUMENT if action == "empty"
                        else grpc.StatusCode.NOT_FOUND)
            assert outcome.code is expected, outcome
            if action == "unknown":
                assert graph_id in outcome.details
        else:
            fuzz_stub.RegisterGraph(executor_pb2.RegisterGraphRequest(graph=mlp_graph()),
                                    timeout=10)
            request = _mlp_run(None)
            request.graph.CopyFrom(executor_pb2.GraphRef(graph_id=valid_id))
            response = fuzz_stub.Run(request, timeout=10)
            np.testing.assert_allclose(array_of(response.outputs["h"]), X @ W, rtol=1e-12)
            tally.calls += 1
        check.tick()

    fuzz()
    print(tally.codes)
