"""The per-request fast paths of the wire mapping agree with the plain ones: records
built from a dict, metrics filled in place, planner reports decoded once, tensors
decoded in one step on the server, policies parsed once per wire form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from remat_proto import policies, wire
from remat_proto.results import Metrics, PlannerReport, from_fields
from remat_proto.v1 import executor_pb2, tensor_pb2
from remat_server.errors import InvalidArgument
from remat_server.graph.limits import Limits
from remat_server.service import codec

REPORT = PlannerReport(
    budget_bytes=1 << 32, status="feasible", optimality_gap=0.25, detail="why", chosen="x"
)
METRICS = [
    Metrics(),
    Metrics(peak_bytes=8, forward_seconds=1e-5, policy="store_all", plan_cached=True),
    Metrics(
        **{f.name: 3 for f in dataclasses.fields(Metrics) if f.type in ("int", "float")},
        policy="budget(0.5)",
        planner=REPORT,
    ),
]


@pytest.mark.parametrize("metrics", METRICS)
def test_from_fields_is_the_constructor(metrics):
    values = {f.name: getattr(metrics, f.name) for f in dataclasses.fields(Metrics)}
    for subset in (values, {k: v for k, v in values.items() if v}):
        built = from_fields(Metrics, subset)
        assert built == Metrics(**subset) and hash(built) == hash(Metrics(**subset))
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.peak_bytes = 1


def test_from_fields_needs_every_field_without_a_default():
    @dataclasses.dataclass(frozen=True)
    class Needs:
        value: int
        other: int
        label: str = "x"

    assert from_fields(Needs, {"value": 1, "other": 2}) == Needs(1, 2)
    with pytest.raises(TypeError, match="needs other"):
        from_fields(Needs, {"value": 1})


def test_from_fields_refuses_a_default_factory():
    @dataclasses.dataclass(frozen=True)
    class Made:
        items: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="default factory"):
        from_fields(Made, {})


@pytest.mark.parametrize("metrics", METRICS)
def test_metrics_round_trip_through_the_fast_paths(metrics):
    message = executor_pb2.RunResponse()
    wire.fill_metrics(message.metrics, metrics)
    assert message.metrics == wire.metrics_to_proto(metrics)
    decoded = executor_pb2.RunResponse.FromString(message.SerializeToString()).metrics
    assert wire.metrics_from_proto(decoded) == metrics
    if metrics.planner is not None:  # decoded once: the same immutable object again
        assert wire.metrics_from_proto(decoded).planner is wire.metrics_from_proto(decoded).planner


TENSORS = [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array(2.5),
    np.zeros((0, 4), np.int32),
    np.array([True, False]),
    np.arange(3, dtype=np.int64),
]


@pytest.mark.parametrize("array", TENSORS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_server_decodes_tensors_in_one_step_as_the_checked_path_does(array):
    request = executor_pb2.RunRequest()
    wire.fill_tensor(request.inputs["x"], array)
    fast = codec.tensors_to_arrays(request.inputs, Limits(), "input")["x"]
    checked = codec.tensor_to_array(request.inputs["x"], Limits(), "input 'x'")
    assert fast.dtype == checked.dtype and fast.shape == checked.shape
    assert np.array_equal(fast, checked) and not fast.flags.writeable


def _tensor(dtype=tensor_pb2.FLOAT32, shape=(2,), data=b"\0" * 8, chunked=False):
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data, chunked=chunked)


@pytest.mark.parametrize(
    "tensor, limits, message",
    [
        (_tensor(dtype=99), Limits(), "input 'x': dtype 99"),
        (_tensor(shape=(2, 1, 1)), Limits(max_rank=2), "rank 3"),
        (_tensor(shape=(-2,)), Limits(), "negative"),
        (_tensor(shape=(3,), data=b"\0" * 12), Limits(max_dim=2), "--max-dim"),
        (_tensor(shape=(2, 2), data=b"\0" * 16), Limits(max_elements=3), "--max-elements"),
        (_tensor(data=b"\0" * 7), Limits(), "bytes of data"),
        (_tensor(chunked=True), Limits(), "chunked"),
    ],
)
def test_tensors_outside_the_fast_path_are_refused_by_name(tensor, limits, message):
    request = executor_pb2.RunRequest()
    request.inputs["x"].CopyFrom(tensor)
    with pytest.raises(InvalidArgument, match=message) as error:
        codec.tensors_to_arrays(request.inputs, limits, "input")
    assert "input 'x'" in str(error.value)


def test_policies_are_parsed_once_per_wire_form_and_errors_never_remembered():
    message = wire.policy_to_proto(policies.Budget(fraction=0.5))
    first = codec.policy_from_proto(message)
    assert first == policies.Budget(fraction=0.5)
    assert codec.policy_from_proto(executor_pb2.Policy.FromString(message.SerializeToString())) is (
        first
    )
    bad = executor_pb2.Policy()
    bad.every_k.k = 0
    for _ in range(2):  # an invalid policy raises every time
        with pytest.raises(InvalidArgument, match="policy every_k"):
            codec.policy_from_proto(bad)
    long_name = executor_pb2.Policy(name="x" * 1000)  # past the memo's key size
    with pytest.raises(InvalidArgument, match="unknown policy"):
        codec.policy_from_proto(long_name)
