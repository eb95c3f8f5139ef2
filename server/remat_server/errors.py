"""Domain errors. The servicer maps each class to one gRPC status code.

Domain code raises these; it never imports grpc. Messages are written for the
person who built the graph: they name the node (and where the SDK built it).
"""

from __future__ import annotations

from remat_proto.spec import where  # noqa: F401 (re-exported: every stage names nodes)


class RematError(Exception):
    """Base class; `code` is the gRPC status name the servicer will use."""

    code = "INTERNAL"


class InvalidArgument(RematError):
    code = "INVALID_ARGUMENT"


class ResourceExhausted(RematError):
    code = "RESOURCE_EXHAUSTED"


class ResponseTooLarge(ResourceExhausted):
    """The results would not fit in one message; the client should use RunStream."""


class NotFound(RematError):
    code = "NOT_FOUND"


class Cancelled(RematError):
    code = "CANCELLED"


class DeadlineExceeded(RematError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(RematError):
    code = "UNIMPLEMENTED"


class ShapeError(ValueError):
    """Raised by an op's shape rule; the graph builder adds the node's name."""
