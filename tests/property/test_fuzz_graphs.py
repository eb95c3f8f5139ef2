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
from fuzz_support import (
    CALL_TIMEOUT,
    OP_NAMES,
    POLICY_KINDS,
    Checkpointed,
    Tally,
    W,
    X,
    array_of,
    check_answer,
    fuzz_settings,
    hostile,
    inp,
    mlp_graph,
    node,
    tensor,
)
from hypothesis import given
from hypothesis import strategies as st

from remat_proto.v1 import executor_pb2, graph_pb2, tensor_pb2
from remat_server.ops import REGISTRY

F32, F64, I64, BOOL = tensor_pb2.FLOAT32, tensor_pb2.FLOAT64, tensor_pb2.INT64, tensor_pb2.BOOL


@pytest.mark.parametrize(
    "rpcs",
    [("Run",), ("Plan", "Differentiate", "RegisterGraph", "Compare")],
    ids=["run", "plan-differentiate-register-compare"],
)
def test_hostile_graphs_get_a_clear_status(rpcs, fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("hostile_graphs")
    @given(h=hostile, rpc=st.sampled_from(rpcs))
    def fuzz(h, rpc):
        if rpc == "Compare":  # a hostile Run under the baseline and one more policy
            request = executor_pb2.CompareRequest(
                run=h.request(h.graph(), "Run"), policies=[h.policy()]
            )
        else:
            request = h.request(h.graph(), rpc)
        tally.add(check_answer(getattr(fuzz_stub, rpc), request, stream=rpc == "Compare", what=rpc))
        check.tick()

    fuzz()
    print(rpcs, tally.codes)


# --- every op with hostile attributes -----------------------------------------------------
# Inputs every op template draws from: one of each kind the ops take.
POOL = {
    "x": ([2, 3], F64),
    "v": ([3], F64),
    "f": ([2, 3], F32),
    "s": ([], F64),
    "i": ([2], I64),
    "j": ([2, 3], I64),
    "c": ([2, 3], BOOL),
    "img": ([1, 2, 5, 5], F64),
    "k": ([3, 2, 2, 2], F64),
    "cols": ([1, 8, 16], F64),
    "kt": ([2, 3, 2, 2], F64),  # conv_transpose2d's (C_in, C_out / groups, kh, kw) for img
    "ch": ([2], F64),  # per-channel statistics of img
    "q": ([1, 2, 3, 4], F64),  # attention's (batch, heads, sequence, features)
}
POOL_NAMES = sorted(POOL)
# Inputs that fit an op (else any from the pool, in the op's arity).
FITS = {
    "matmul": ["x", "v"],
    "where": ["c", "x", "v"],
    "layer_norm": ["x", "v", "v"],
    "cross_entropy": ["x", "i"],
    "take": ["x", "i"],
    "take_along_axis": ["x", "j"],
    "scatter_add": ["x", "i"],
    "scatter_add_along_axis": ["x", "j"],
    "one_hot": ["i"],
    "conv2d": ["img", "k"],
    "max_pool2d": ["img"],
    "avg_pool2d": ["img"],
    "unfold": ["img"],
    "fold": ["cols"],
    "constant": [],
    "cast": ["x"],
    "concat": ["x", "f"],
    "conv_transpose2d": ["img", "kt"],
    "batch_norm": ["img", "ch", "ch", "ch", "ch"],
    "rms_norm": ["x", "v"],
    "scaled_dot_product_attention": ["q", "q", "q"],
    "upsample_nearest2d": ["img"],
    "upsample_bilinear2d": ["img"],
    "pad": ["img"],
    # The gradient ops VJPs emit (cotangent last), reachable by any client too.
    **dict.fromkeys(
        ["erf_grad", "gelu_grad", "leaky_relu_grad", "sigmoid_grad", "silu_grad", "tanh_grad"],
        ["x", "x"],
    ),
    **dict.fromkeys(["softmax_grad", "log_softmax_grad"], ["x", "x"]),
    **dict.fromkeys(["layer_norm_grad", "rms_norm_grad"], ["x", "v", "x"]),
    **dict.fromkeys(["layer_norm_weight_grad", "rms_norm_weight_grad"], ["x", "x"]),
    "batch_norm_grad": ["img", "ch", "img"],
    "batch_norm_weight_grad": ["img", "ch", "ch", "img"],
    "cross_entropy_grad": ["x", "i", "s"],
    **dict.fromkeys(["conv2d_weight_grad", "max_pool2d_grad", "max_pool2d_gather"], ["img", "img"]),
    "avg_pool2d_grad": ["img"],
}


def op_case(h, op_name: str):
    """A graph of one `op_name` node "n" on inputs that (mostly) fit it, with hostile
    attributes, plus loss = sum(cast(n, float64)) and wrt its float inputs (mostly)."""
    op = REGISTRY[op_name]
    if op_name in FITS and h.chance(0.8):
        chosen = FITS[op_name]
    else:
        count = op.min_inputs if op.max_inputs >= 0 else h.r.randint(op.min_inputs, 3)
        chosen = [h.pick(POOL_NAMES) for _ in range(count)]
    message = graph_pb2.NodeDef(name="n", op=op_name, inputs=chosen, source="fuzz.py:1")
    for attr_name, attr in op.attrs.items():
        if attr.required or h.chance(0.5):
            message.attrs[attr_name].CopyFrom(h.attr_value(attr.type))
    used = sorted(set(chosen))
    nodes, outputs = [message], [("out", "n")]
    floats = [name for name in used if POOL[name][1] in (F32, F64)]
    wrt, loss = [], ""
    if floats and h.chance(0.75):
        nodes += [
            node("n64", "cast", ["n"], dtype=graph_pb2.AttrValue(s="float64")),
            node("l", "sum", ["n64"]),
        ]
        outputs.append(("loss", "l"))
        wrt = sorted({h.pick(floats) for _ in range(h.r.randint(1, 2))})
        loss = "loss"
    graph = graph_pb2.Graph(
        name=op_name,
        inputs=[inp(n, *POOL[n]) for n in used],
        nodes=nodes,
        outputs=[graph_pb2.OutputDef(name=o, node=n) for o, n in outputs],
    )
    return graph, wrt, loss


def test_every_op_with_hostile_attributes(fuzz_stub):
    """Each case reaches shape inference, and when that passes, the executor, the VJP
    rules, and a second differentiation of the joint graph."""
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("op_templates")
    @given(
        h=hostile,
        op_name=st.sampled_from(OP_NAMES),
        rpc=st.sampled_from(["Run", "Run", "Run", "Plan", "Differentiate"]),
    )
    def fuzz(h, op_name, rpc):
        message, wrt, loss = op_case(h, op_name)
        ref = executor_pb2.GraphRef(graph=message)
        if rpc == "Run":
            request = executor_pb2.RunRequest(
                graph=ref, wrt=wrt, loss=loss, policy=h.policy("unset" if h.chance(0.7) else None)
            )
            h.level = min(h.level, 0.05)  # the attributes are the hostile part here
            h.feeds(message, request)
        elif rpc == "Plan":
            request = executor_pb2.PlanRequest(graph=ref, wrt=wrt, loss=loss, policy=h.policy())
        else:
            request = executor_pb2.DifferentiateRequest(graph=ref, wrt=wrt, loss=loss)
        outcome = check_answer(getattr(fuzz_stub, rpc), request, what=rpc)
        tally.add(outcome)
        if rpc == "Differentiate" and outcome.code is grpc.StatusCode.OK:
            # Differentiate the joint graph again (a VJP of the VJP, cotangent mode).
            again = executor_pb2.DifferentiateRequest(
                graph=executor_pb2.GraphRef(graph=outcome.response.graph), wrt=wrt
            )
            tally.add(check_answer(fuzz_stub.Differentiate, again, what="Differentiate again"))
        check.tick()

    fuzz()
    print(tally.codes)


# --- policies --------------------------------------------------------------------------
def _mlp_run(policy) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["x", "w"], loss="loss", policy=policy
    )
    request.inputs["x"].CopyFrom(tensor(X))
    request.inputs["w"].CopyFrom(tensor(W))
    return request


def test_policies_with_hostile_parameters(fuzz_stub):
    """Any policy either runs and gives store_all's numbers, or is refused clearly."""
    tally, check = Tally(), Checkpointed(fuzz_stub)
    hidden = X @ W

    @fuzz_settings("policies")
    @given(
        h=hostile,
        kind=st.sampled_from(POLICY_KINDS),
        rpc=st.sampled_from(["Run", "Plan", "Compare"]),
    )
    def fuzz(h, kind, rpc):
        policy = h.policy(kind)
        if rpc == "Plan":
            request = executor_pb2.PlanRequest(
                graph=executor_pb2.GraphRef(graph=mlp_graph()),
                wrt=["x"],
                loss="loss",
                policy=policy,
            )
            tally.add(check_answer(fuzz_stub.Plan, request, what="Plan"))
        elif rpc == "Compare":
            request = executor_pb2.CompareRequest(run=_mlp_run(None), policies=[policy])
            outcome = check_answer(fuzz_stub.Compare, request, stream=True, what="Compare")
            tally.add(outcome)
            for result in outcome.response or ():
                assert result.error or result.max_grad_diff == 0.0, result
                if result.error:
                    assert result.error_code not in ("INTERNAL", "UNKNOWN", ""), result
        else:
            outcome = check_answer(fuzz_stub.Run, _mlp_run(policy), what="Run")
            tally.add(outcome)
            if outcome.code is grpc.StatusCode.OK:  # every schedule: the same numbers
                grads = outcome.response.grads
                np.testing.assert_allclose(array_of(grads["x"]), 2 * hidden @ W.T, rtol=1e-12)
                np.testing.assert_allclose(array_of(grads["w"]), X.T @ (2 * hidden), rtol=1e-12)
        check.tick()

    fuzz()
    print(tally.codes)


def test_profiled_budget_on_a_graph_that_reads_a_value_twice(fuzz_stub):
    """Found by the fuzzing above: budget(profile) on `mul(h, h)` freed `h` twice in the
    profiling pass (KeyError: INTERNAL). The fix is in profile.py (see the report)."""
    policy = executor_pb2.Policy(budget=executor_pb2.Budget(fraction=1.0, profile=True))
    outcome = check_answer(fuzz_stub.Run, _mlp_run(policy), what="Run budget(profile)")
    assert outcome.code is grpc.StatusCode.OK, outcome
    hidden = X @ W
    np.testing.assert_allclose(
        array_of(outcome.response.grads["w"]), X.T @ (2 * hidden), rtol=1e-12
    )


# --- graph references ------------------------------------------------------------------
def test_graph_references_register_run_and_evict(fuzz_stub):
    """Hostile registrations and ids between valid ones: a valid graph registered just
    before its Run always runs correctly; an id that was never (or is no longer)
    registered gives NOT_FOUND naming it; an empty id gives INVALID_ARGUMENT."""
    tally, check = Tally(), Checkpointed(fuzz_stub)
    valid_id = fuzz_stub.RegisterGraph(
        executor_pb2.RegisterGraphRequest(graph=mlp_graph()), timeout=CALL_TIMEOUT
    ).graph_id

    @fuzz_settings("graph_refs")
    @given(h=hostile, action=st.sampled_from(["register", "register", "unknown", "empty", "valid"]))
    def fuzz(h, action):
        if action == "register":
            message = h.graph()
            outcome = check_answer(
                fuzz_stub.RegisterGraph,
                executor_pb2.RegisterGraphRequest(graph=message),
                what="RegisterGraph",
            )
            tally.add(outcome)
            if outcome.code is grpc.StatusCode.OK:
                request = executor_pb2.RunRequest(
                    graph=executor_pb2.GraphRef(graph_id=outcome.response.graph_id)
                )
                h.feeds(message, request)
                tally.add(check_answer(fuzz_stub.Run, request, what="Run by id"))
        elif action in ("unknown", "empty"):
            graph_id = (
                ""
                if action == "empty"
                else h.pick([h.text(70) or "?", "0" * 64, valid_id[::-1], valid_id.upper()])
            )
            request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph_id=graph_id))
            outcome = check_answer(fuzz_stub.Run, request, what="Run by id")
            tally.add(outcome)
            expected = (
                grpc.StatusCode.INVALID_ARGUMENT if action == "empty" else grpc.StatusCode.NOT_FOUND
            )
            assert outcome.code is expected, outcome
            if action == "unknown":
                assert graph_id in outcome.details
        else:
            fuzz_stub.RegisterGraph(
                executor_pb2.RegisterGraphRequest(graph=mlp_graph()), timeout=CALL_TIMEOUT
            )
            request = _mlp_run(None)
            request.graph.CopyFrom(executor_pb2.GraphRef(graph_id=valid_id))
            response = fuzz_stub.Run(request, timeout=CALL_TIMEOUT)
            np.testing.assert_allclose(array_of(response.outputs["h"]), X @ W, rtol=1e-12)
            tally.calls += 1
        check.tick()

    fuzz()
    print(tally.codes)
