"""How the SDK connects: TLS settings, bearer tokens, and the channel built from them.

    >>> import remat
    >>> tls = remat.TLS(root_certificates_file="ca.pem")     # trust a private CA
    >>> # remat.Client("remat.internal:443", tls=tls, token="s3cret")
    >>> # remat.Client("remat.example.com:443", tls=True)   # the system's trusted roots

Tokens are not meant for command lines: pass `token=`, or set REMAT_TOKEN or
REMAT_TOKEN_FILE (a file holding the token) in the environment.

With TLS the token rides on gRPC call credentials (`access_token_call_credentials`).
gRPC refuses call credentials on an insecure channel, so there a client interceptor
adds the same `authorization: Bearer <token>` metadata: meant for loopback and
trusted private networks, since the token then travels in clear text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from remat_proto import metadata

from .targets import channel_target

TOKEN_ENV = "REMAT_TOKEN"
TOKEN_FILE_ENV = "REMAT_TOKEN_FILE"


@dataclass(frozen=True)
class TLS:
    """TLS settings for `remat.Client(target, tls=remat.TLS(...))`.

    Every field is optional. No root certificates: the system's trusted roots. A
    certificate with its private key: mutual TLS (the server asks for a client
    certificate). Give PEM files by path, or PEM bytes in `root_certificates`,
    `certificate` and `private_key`. `server_name_override` checks the server's
    certificate against that name instead of the target's host (tests, IP targets).

        >>> import remat
        >>> tls = remat.TLS(root_certificates_file="ca.pem",
        ...                 certificate_file="client.pem", private_key_file="client.key")
        >>> tls.mutual
        True
        >>> # with remat.Client("remat.internal:50051", tls=tls) as client: ...
    """

    root_certificates_file: str = ""
    certificate_file: str = ""
    private_key_file: str = ""
    server_name_override: str | None = None
    root_certificates: bytes | None = None
    certificate: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self):
        for name in ("root_certificates", "certificate", "private_key"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file"):
                raise ValueError(f"TLS: give {name} or {name}_file, not both")
        has_cert = bool(self.certificate_file or self.certificate)
        has_key = bool(self.private_key_file or self.private_key)
        if has_cert != has_key:
            raise ValueError("TLS: a client certificate needs its private key and vice versa")

    @property
    def mutual(self) -> bool:
        return bool(self.certificate_file or self.certificate)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, self.root_certificates_file, "root"),
            private_key=_pem(self.private_key, self.private_key_file, "private key"),
            certificate_chain=_pem(self.certificate, self.certificate_file, "certificate"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if not self.server_name_override:
            return []
        return [("grpc.ssl_target_name_override", self.server_name_override)]


def _pem(data: bytes | None, path: str, what: str) -> bytes | None:
    if data is not None or not path:
        return data
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"cannot read TLS {what} file {path!r}: {error.strerror}") from None


def resolve_tls(tls: TLS | bool | None) -> TLS | None:
    """None/False: no TLS; True: TLS trusting the system's roots; a TLS: itself."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return TLS()
    if isinstance(tls, TLS):
        return tls
    raise TypeError(f"tls must be None, a bool or remat.TLS, got {type(tls).__name__}")


def resolve_token(token: str | None) -> str | None:
    """`token` itself; if None, REMAT_TOKEN, else the contents of REMAT_TOKEN_FILE.
    An empty string means no token (and ignores the environment)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or _token_from_file(os.environ.get(TOKEN_FILE_ENV, ""))
    token = (token or "").strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        # gRPC metadata values cannot hold control characters; say so before it does.
        raise ValueError("the bearer token contains whitespace or control characters")
    return token or None


def _token_from_file(path: str) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as error:
        raise ValueError(f"cannot read {TOKEN_FILE_ENV} {path!r}: {error.strerror}") from None
    if not token:
        raise ValueError(f"{TOKEN_FILE_ENV} {path!r} is empty")
    return token


def make_channel(
    target: str | Sequence[str],
    options: Iterable[tuple[str, Any]] = (),
    *,
    tls: TLS | bool | None = None,
    token: str | None = None,
    aio: bool = False,
):
    """A `grpc.Channel` (a `grpc.aio.Channel` when `aio`) to `target` (see
    `remat.targets.channel_target`) with the given TLS settings (see `resolve_tls`)
    and bearer token (see `resolve_token`)."""
    options = list(options)
    target = channel_target(target)
    settings, token = resolve_tls(tls), resolve_token(token)
    if settings is None:
        return _insecure_channel(target, options, token, aio)
    credentials = settings.channel_credentials()
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    options += settings.channel_options()
    if aio:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _insecure_channel(target: str, options: list, token: str | None, aio: bool):
    if aio:
        interceptors = [kind(token) for kind in _AIO_BEARERS] if token else None
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def _with_token(details, token: str):
    entries = list(details.metadata or ())
    entries.append((metadata.AUTHORIZATION, metadata.BEARER + token))
    return entries


class _CallDetails(grpc.ClientCallDetails):
    # grpc.ClientCallDetails is abstract: interceptors must bring their own record.
    def __init__(self, details, metadata):
        self.method, self.metadata = details.method, metadata
        self.timeout, self.credentials = details.timeout, details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call on an insecure (sync) channel."""

    def __init__(self, token: str):
        self._token = token

    def _intercept(self, continuation, details, request):
        return continuation(_CallDetails(details, _with_token(details, self._token)), request)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


class _AioBearer:
    """The same for `grpc.aio` channels (their details are a namedtuple). grpc.aio files
    an interceptor under the first call kind it implements only (grpc/grpc#31442), so
    each kind gets its own subclass."""

    def __init__(self, token: str):
        self._token = token

    async def _intercept(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*_with_token(details, self._token))
        return await continuation(details._replace(metadata=metadata), request)


class _AioBearerUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioBearer._intercept


class _AioBearerUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioBearer._intercept


class _AioBearerStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioBearer._intercept


class _AioBearerStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioBearer._intercept


_AIO_BEARERS = (
    _AioBearerUnaryUnary,
    _AioBearerUnaryStream,
    _AioBearerStreamUnary,
    _AioBearerStreamStream,
)
