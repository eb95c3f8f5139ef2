"""Store-versus-recompute policies, chosen per request.

A policy decides which forward values the backward pass keeps and which it
recomputes from kept ones. Every policy computes bit-identical gradients; they differ
only in peak memory and time. Pass an object, or a parameterless policy's name, as
`policy=` to `Client.run`, `Client.plan` and `Client.compare`:

    >>> from remat import policies
    >>> policies.resolve("sqrt")
    Sqrt()
    >>> policies.parse("every_k:4"), policies.parse("save_ops:matmul,conv2d")
    (EveryK(k=4), SaveOps(ops=('matmul', 'conv2d')))
    >>> policies.label(policies.Revolve(slots=3))
    'revolve(3)'

Obvious misuse fails here, before anything is sent (`EveryK(0)` raises ValueError);
what only the server can check (a checkpoint name that is not a node, an unknown op,
Revolve on a graph without a chain) raises `remat.InvalidArgumentError`, itself a
ValueError.

The policies are defined once, in `remat_proto.policies`, for the SDK and the server
alike; this module is their public home in the SDK.
"""

from remat_proto.policies import (
    DTR,
    FORMS,
    Auto,
    Budget,
    Checkpoints,
    EveryK,
    MinMemory,
    Optimal,
    Policy,
    RecomputeAll,
    Revolve,
    SaveOps,
    Sqrt,
    StoreAll,
    label,
    parse,
    resolve,
)

__all__ = [
    "StoreAll",
    "RecomputeAll",
    "EveryK",
    "Sqrt",
    "Checkpoints",
    "SaveOps",
    "Revolve",
    "Budget",
    "Optimal",
    "DTR",
    "Auto",
    "MinMemory",
    "Policy",
    "resolve",
    "parse",
    "label",
    "FORMS",
]
