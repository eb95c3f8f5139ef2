"""remat's exceptions. gRPC errors are converted here, in one place.

Every exception carries the server's message, which names the offending node (and
where your code built it) for graph errors.

    >>> try:
    ...     raise InvalidArgumentError("node 'h' (matmul): inner dimensions differ")
    ... except RematError as err:
    ...     err.code
    'INVALID_ARGUMENT'
"""

from __future__ import annotations

import grpc


class RematError(Exception):
    """Base class of every error the SDK raises for a failed call."""

    code = "UNKNOWN"
    metadata: dict = {}


class InvalidArgumentError(RematError, ValueError):
    code = "INVALID_ARGUMENT"


class ResourceExhaustedError(RematError):
    code = "RESOURCE_EXHAUSTED"


class NotFoundError(RematError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnavailableError(RematError, ConnectionError):
    code = "UNAVAILABLE"


class CancelledError(RematError):
    code = "CANCELLED"


class DeadlineExceededError(RematError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class UnauthenticatedError(RematError, PermissionError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(RematError, PermissionError):
    code = "PERMISSION_DENIED"


class UnimplementedError(RematError, NotImplementedError):
    code = "UNIMPLEMENTED"


class InternalError(RematError):
    code = "INTERNAL"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        NotFoundError,
        UnavailableError,
        CancelledError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
    )
}


# gRPC's own refusals, made before any remat code runs, with the setting to change.
_GRPC_HINTS = {
    "Concurrent RPC limit exceeded!": "Concurrent RPC limit exceeded! The server is at its "
    "limit of concurrent calls (server flag --max-concurrent-rpcs); retry later or raise it",
}


def from_rpc_error(error: grpc.RpcError) -> RematError:
    """The remat exception for a failed RPC, keeping the server's message."""
    code = error.code() if hasattr(error, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    details = _GRPC_HINTS.get(details, details)
    exc = _BY_CODE.get(name, RematError)(details or name)
    exc.code = name
    # The server's trailing metadata, e.g. "remat-use-stream" on a too-big Run result.
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    exc.metadata = dict(trailing or ())
    return exc
