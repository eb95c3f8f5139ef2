"""The op library. Importing this package registers every op family."""

from . import conv, elementwise, linalg, nn, random, reduce, shape  # noqa: F401  (registration)
from .registry import REGISTRY, Attr, OpDef, get, register

__all__ = ["REGISTRY", "Attr", "OpDef", "get", "register"]
