"""The op library. Importing this package registers every op family."""

from . import (  # noqa: F401  (registration)
    activation_grad,
    activations,
    attention,
    conv,
    conv_grad,
    conv_transpose,
    elementwise,
    linalg,
    logical,
    nn,
    nn_grad,
    norm,
    norm_grad,
    pool,
    pool_grad,
    random,
    reduce,
    resize,
    shape,
)
from .registry import REGISTRY, Attr, OpDef, get, register

__all__ = ["REGISTRY", "Attr", "OpDef", "get", "register"]
