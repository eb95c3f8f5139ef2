"""The op library. Importing this package registers every op family."""

from . import (  # noqa: F401  (registration)
    activations,
    attention,
    conv,
    conv_transpose,
    elementwise,
    linalg,
    logical,
    nn,
    norm,
    random,
    reduce,
    resize,
    shape,
)
from .registry import REGISTRY, Attr, OpDef, get, register

__all__ = ["REGISTRY", "Attr", "OpDef", "get", "register"]
