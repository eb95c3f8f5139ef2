"""The importer's errors: one public exception, and the internal signal of an
unsupported node (collected, so that one error lists every problem of a model)."""

from __future__ import annotations


class OnnxImportError(ValueError):
    """A model remat cannot import; the message names the node (name and op type) or
    the field at fault. The server answers it with INVALID_ARGUMENT."""


class Unsupported(Exception):
    """A node (or one of its attribute values) remat does not support; the converter
    records it and carries on, so the final error lists them all."""
