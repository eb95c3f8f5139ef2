"""Any bytes a client sends, to any RPC, get a clear answer.

Two sources: arbitrary bytes, and valid requests with bytes flipped, cut, inserted or
repeated (these mostly still parse, so they reach the server's own checks with broken
lengths, varints, unknown fields, invalid UTF-8 and wrong wire types).
"""

from __future__ import annotations

import grpc
import pytest
from fuzz_support import (
    Checkpointed,
    Tally,
    W,
    X,
    check_answer,
    fuzz_settings,
    mlp_graph,
    mutated,
    tensor,
)
from hypothesis import given
from hypothesis import strategies as st

from remat_proto.v1 import executor_pb2

RPCS = ("Run", "Plan", "Differentiate", "RegisterGraph", "ListOps", "Compare")


def _run_request() -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()),
        wrt=["x", "w"],
        loss="loss",
        policy=executor_pb2.Policy(every_k=executor_pb2.EveryK(k=1)),
    )
    request.inputs["x"].CopyFrom(tensor(X))
    request.inputs["w"].CopyFrom(tensor(W))
    return request


# A valid request per RPC: the seeds the mutations start from.
SEEDS = {
    "Run": _run_request(),
    "Plan": executor_pb2.PlanRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()),
        wrt=["x"],
        loss="loss",
        include_schedule=True,
        policy=executor_pb2.Policy(name="sqrt"),
    ),
    "Differentiate": executor_pb2.DifferentiateRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["w"], loss="loss"
    ),
    "RegisterGraph": executor_pb2.RegisterGraphRequest(graph=mlp_graph()),
    "ListOps": executor_pb2.ListOpsRequest(),
    "Compare": executor_pb2.CompareRequest(
        run=_run_request(), policies=[executor_pb2.Policy(name="recompute_all")]
    ),
}
SEED_BYTES = {rpc: message.SerializeToString() for rpc, message in SEEDS.items()}


@pytest.mark.parametrize("rpc", RPCS)
def test_arbitrary_bytes_get_a_clear_status(rpc, raw_methods, fuzz_stub):
    call, tally, check = raw_methods[rpc], Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("raw_bytes")
    @given(data=st.one_of(st.binary(max_size=64), st.binary(max_size=2048)))
    def fuzz(data):
        tally.add(check_answer(call, data, stream=rpc == "Compare", what=rpc))
        check.tick()

    fuzz()
    print(rpc, tally.codes)


@pytest.mark.parametrize("rpc", RPCS)
def test_mutated_valid_requests_get_a_clear_status(rpc, raw_methods, fuzz_stub):
    call, tally, check = raw_methods[rpc], Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("mutated_bytes")
    @given(data=mutated(SEED_BYTES[rpc]))
    def fuzz(data):
        tally.add(check_answer(call, data, stream=rpc == "Compare", what=rpc))
        check.tick()

    fuzz()
    print(rpc, tally.codes)


# Found by the fuzzing above: gRPC answers INTERNAL "Exception deserializing request!"
# when the generated deserializer raises, before any remat code runs. The fix parses
# the bytes inside the handler (see the issue-5 fuzzing report for app.py).
UNPARSABLE = [b"\xff", b"\x0a\x05abc", b"\x12\x03\xff\xfe\xfd", b"\x0a\x02\x0a\xff"]


@pytest.mark.parametrize("rpc", RPCS)
def test_bytes_that_do_not_parse_are_invalid_argument(rpc, raw_methods):
    for data in UNPARSABLE:
        outcome = check_answer(raw_methods[rpc], data, stream=rpc == "Compare", what=rpc)
        if outcome.code is not grpc.StatusCode.OK:  # some of these parse for some RPCs
            assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, outcome
