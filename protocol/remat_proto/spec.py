"""A graph as sent: inputs, nodes and outputs, decoded but not yet checked.

The SDK builds these, the wire carries them, and the server validates them once, at
its boundary, into its IR (`remat_server.graph`). Any names, ops and attrs may appear
here; nothing downstream of validation sees a spec.

    >>> spec = GraphSpec("g", inputs=(InputSpec("x", (2, 3), "float32"),),
    ...                  nodes=(NodeSpec("y", "relu", ("x",)),), outputs=(("y", "y"),))
    >>> spec.nodes[0].op
    'relu'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # a leading -1 is a batch dimension bound at run time
    dtype: str
    source: str = ""  # file:line of the user's code that declared it, for errors


# Immutable by convention, not `frozen=True`: a frozen dataclass's __init__ costs 3.7
# times a plain one's (0.98 against 0.27 us), paid for every node a server decodes.
@dataclass(slots=True)
class NodeSpec:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True, slots=True)
class GraphSpec:
    name: str
    inputs: tuple[InputSpec, ...]
    nodes: tuple[NodeSpec, ...]
    # (output name, node name) pairs, in declaration order.
    outputs: tuple[tuple[str, str], ...]


def array_bytes(nodes: Iterable[NodeSpec]) -> int:
    """Bytes of the arrays (constants) the nodes' attributes hold; takes any nodes with
    `attrs`, a spec's or the server's IR's.

    >>> import numpy as np
    >>> array_bytes([NodeSpec("c", "constant", (), {"value": np.zeros(4)})])
    32
    """
    return sum(getattr(value, "nbytes", 0) for node in nodes for value in node.attrs.values())


def where(name: str, op: str = "", source: str = "") -> str:
    """Describe a node for an error message: "node 'h1' (matmul, built at m.py:3)".

    >>> where("h1", "matmul", "m.py:3")
    "node 'h1' (matmul, built at m.py:3)"
    """
    details = [part for part in (op, f"built at {source}" if source else "") if part]
    return f"node '{name}'" + (f" ({', '.join(details)})" if details else "")
