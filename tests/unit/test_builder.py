"""GraphBuilder reuses a checked signature's result (complete attrs and type) for the
next node with the same op, input types and attrs: the reuse must give exactly what
checking the node afresh gives, and never share what belongs to one node."""

from __future__ import annotations

import pytest

from remat_server.graph.builder import GraphBuilder
from remat_server.graph.ir import TensorType
from remat_server.graph.limits import Limits

X = TensorType((3, 4), "float32")

# (op, attrs): nodes added twice on the same input, reading `x`
SIGNATURES = [
    ("relu", {}),
    ("sum", {"axes": (1,), "keepdims": True}),
    ("reshape", {"shape": (4, 3)}),
    ("pow", {"exponent": 2}),  # an int for a float attr: coerced the same both times
    ("transpose", {}),
]


def fresh(op: str, attrs: dict):
    builder = GraphBuilder("g", Limits())
    builder.add_input("x", X)
    return builder.add(op, ["x"], dict(attrs), "only")


@pytest.mark.parametrize(("op", "attrs"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_a_repeated_signature_gives_what_a_fresh_check_gives(op, attrs):
    builder = GraphBuilder("g", Limits())
    builder.add_input("x", X)
    first = builder.add(op, ["x"], dict(attrs), "first", "a.py:1")
    second = builder.add(op, ["x"], dict(attrs), "second", "a.py:2")
    expected = fresh(op, attrs)
    for node in (first, second):
        assert (node.type, dict(node.attrs)) == (expected.type, dict(expected.attrs))
    assert (second.name, second.source, second.inputs) == ("second", "a.py:2", ("x",))


def test_an_attr_defaulting_to_the_node_name_is_never_shared():
    """dropout's `key` defaults to the node's own name: two dropouts of one signature
    draw different masks."""
    builder = GraphBuilder("g", Limits())
    builder.add_input("x", X)
    first = builder.add("dropout", ["x"], {"p": 0.5}, "d1")
    second = builder.add("dropout", ["x"], {"p": 0.5}, "d2")
    assert (first.attrs["key"], second.attrs["key"]) == ("d1", "d2")
