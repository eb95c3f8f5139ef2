"""remat: build a graph in Python, run it and its gradients on a remat server.

>>> import numpy as np, remat
>>> g = remat.Graph("quadratic")
>>> x = g.input("x", (3,), dtype="float64")
>>> _ = g.output("loss", remat.sum(x ** 2))
>>> with remat.Client.in_process() as client:
...     print(client.run(g, {"x": np.ones(3)}, wrt=["x"], loss="loss").grads["x"])
[2. 2. 2.]
"""

from . import models, policies
from .aio import AsyncClient
from .calls import NO_RETRY, Retry
from .client import Client
from .compare import ComparisonRow, format_table
from .credentials import TLS
from .errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RematError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .gradcheck import gradcheck, numeric_gradient
from .graph import Graph, Node
from .ops import (
    abs,
    add,
    avg_pool2d,
    broadcast_to,
    cast,
    concat,
    constant,
    conv2d,
    cross_entropy,
    div,
    dropout,
    eq,
    exp,
    ge,
    gelu,
    gt,
    layer_norm,
    le,
    log,
    log_softmax,
    lt,
    matmul,
    max,
    max_pool2d,
    maximum,
    mean,
    minimum,
    mul,
    neg,
    op,
    pow,
    relu,
    reshape,
    sigmoid,
    sign,
    slice,
    softmax,
    sqrt,
    square,
    sub,
    sum,
    take,
    take_along_axis,
    tanh,
    transpose,
    where,
)
from .results import Metrics, OpInfo, PlanResult, RunResult

__version__ = "0.1.0"

__all__ = [
    # graphs and the client
    "Graph",
    "Node",
    "Client",
    "RunResult",
    "Metrics",
    "OpInfo",
    "policies",
    "models",
    "gradcheck",
    "numeric_gradient",
    "PlanResult",
    "ComparisonRow",
    "format_table",
    "TLS",
    "AsyncClient",
    "Retry",
    "NO_RETRY",
    # errors
    "RematError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "NotFoundError",
    "UnavailableError",
    "CancelledError",
    "DeadlineExceededError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnimplementedError",
    "InternalError",
    # ops
    "op",
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "exp",
    "log",
    "sqrt",
    "square",
    "abs",
    "sign",
    "tanh",
    "sigmoid",
    "relu",
    "gelu",
    "maximum",
    "minimum",
    "where",
    "gt",
    "ge",
    "lt",
    "le",
    "eq",
    "cast",
    "constant",
    "sum",
    "mean",
    "max",
    "matmul",
    "transpose",
    "reshape",
    "broadcast_to",
    "concat",
    "slice",
    "take",
    "take_along_axis",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "layer_norm",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "dropout",
]
