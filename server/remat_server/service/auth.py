"""Transport security for the server: TLS (optionally mutual) and bearer tokens.

Secrets never travel on a command line (where `ps` and shell history would show them):
PEM files are named by path, tokens come from a file or the environment.

    >>> import os
    >>> from remat_server import ServerConfig
    >>> from remat_server.service.auth import load_tokens, server_credentials
    >>> os.environ["REMAT_AUTH_TOKENS"] = "s3cret-a, s3cret-b"
    >>> config = ServerConfig(port=0, auth_tokens=load_tokens())
    >>> len(config.auth_tokens), server_credentials(config) is None  # no TLS files: insecure
    (2, True)
    >>> del os.environ["REMAT_AUTH_TOKENS"]

Clients send the token as gRPC metadata `authorization: Bearer <token>`
(`remat.Client(target, token=...)` does it); health checks need none, so load
balancers and Kubernetes probes keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

import grpc

from remat_proto import metadata as keys

from .config import ServerConfig
from .interceptors import refusal

log = logging.getLogger(__name__)

TOKENS_ENV = "REMAT_AUTH_TOKENS"
TLS_ENV = {
    "tls_cert_file": "REMAT_TLS_CERT_FILE",
    "tls_key_file": "REMAT_TLS_KEY_FILE",
    "tls_client_ca_file": "REMAT_TLS_CLIENT_CA_FILE",
}
# Probes must work without a secret; they reveal only SERVING / NOT_SERVING.
UNAUTHENTICATED_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)
# RFC 6750: the scheme is case-insensitive.
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


# --- TLS ------------------------------------------------------------------------------------
def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for `config`, or None when it asks for no TLS (insecure port).

    With `tls_client_ca_file` the server requires a client certificate signed by that
    CA (mutual TLS). Raises ValueError naming the file when one is missing or not PEM.
    """
    if not config.tls:
        if config.tls_client_ca_file:
            raise ValueError(
                "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too"
            )
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        missing = "tls_key_file" if config.tls_cert_file else "tls_cert_file"
        raise ValueError(f"TLS needs both a certificate and a private key; {missing} is not set")
    pair = (
        _read_pem(config.tls_key_file, "private key"),
        _read_pem(config.tls_cert_file, "certificate"),
    )
    client_ca = (
        _read_pem(config.tls_client_ca_file, "client CA") if config.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: str, what: str) -> bytes:
    # gRPC's own error for a bad PEM is a bare handshake failure; name the file up front.
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"cannot read TLS {what} file {path!r}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} file {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def tls_files_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The TLS file paths set in the environment, as ServerConfig keyword arguments:
    REMAT_TLS_CERT_FILE, REMAT_TLS_KEY_FILE, REMAT_TLS_CLIENT_CA_FILE.

        >>> tls_files_from_env({"REMAT_TLS_CERT_FILE": "/etc/remat/tls.crt"})
        {'tls_cert_file': '/etc/remat/tls.crt'}
    """
    environ = os.environ if environ is None else environ
    return {field: environ[var] for field, var in TLS_ENV.items() if environ.get(var)}


# --- tokens ---------------------------------------------------------------------------------
def load_tokens(
    token_file: str = "", env: str = TOKENS_ENV, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """Bearer tokens: one per line from `token_file` (blank lines and '#' comments
    ignored), else comma- or whitespace-separated from the environment variable `env`.
    Neither set: () (no authentication). A named file with no token is an error, so a
    typo cannot silently turn authentication off.

        >>> load_tokens(environ={"REMAT_AUTH_TOKENS": "alpha,beta gamma"})
        ('alpha', 'beta', 'gamma')
    """
    if token_file:
        return _tokens_from_file(token_file)
    environ = os.environ if environ is None else environ
    return tuple(t for t in re.split(r"[\s,]+", environ.get(env, "")) if t)


def _tokens_from_file(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"cannot read token file {path!r}: {reason}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):  # say where, never what: it is a secret
            raise ValueError(f"token file {path!r} line {number}: a token cannot contain spaces")
        tokens.append(line)
    if not tokens:
        raise ValueError(f"token file {path!r} holds no token")
    return tuple(tokens)


def with_security(
    config: ServerConfig,
    *,
    tls_cert_file: str = "",
    tls_key_file: str = "",
    tls_client_ca_file: str = "",
    token_file: str = "",
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """`config` with TLS paths and tokens filled in, for `remat serve`: explicit paths
    (flags) win over REMAT_TLS_* variables; tokens come from `token_file`, else
    REMAT_AUTH_TOKENS. Checks the TLS files at once so a bad deploy fails at start."""
    flags = {
        "tls_cert_file": tls_cert_file,
        "tls_key_file": tls_key_file,
        "tls_client_ca_file": tls_client_ca_file,
    }
    tls = {**tls_files_from_env(environ), **{k: v for k, v in flags.items() if v}}
    config = replace(config, **tls, auth_tokens=load_tokens(token_file, environ=environ))
    server_credentials(config)
    return config


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but health checks unless its metadata carries
    `authorization: Bearer <token>` with one of `tokens`; refusals are UNAUTHENTICATED."""

    def __init__(self, tokens: Iterable[str]):
        tokens = tuple(tokens)
        if not tokens or not all(tokens):
            raise ValueError("TokenInterceptor needs at least one non-empty token")
        # Compare fixed-length digests: compare_digest on raw tokens leaks their length.
        self._digests = tuple(_digest(t.encode()) for t in tokens)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in UNAUTHENTICATED_METHODS:
            return continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return continuation(handler_call_details)
        log.debug("refused %s: %s", handler_call_details.method, problem)  # never the token
        return _refusal(continuation(handler_call_details), problem)

    def _problem(self, metadata) -> str | None:
        """Why the call is refused, or None when its token is valid."""
        values = [v for k, v in metadata if k == keys.AUTHORIZATION]
        if not values:
            return (
                "missing bearer token: send metadata 'authorization: Bearer <token>' "
                "(remat.Client(target, token=...) or REMAT_TOKEN)"
            )
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
        match = _BEARER.fullmatch(value)
        if match is None:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        digest = _digest(match.group(1).encode())
        # Check every token (no early exit) so timing does not tell which one nearly matched.
        valid = False
        for expected in self._digests:
            valid |= hmac.compare_digest(digest, expected)
        return None if valid else "invalid bearer token"


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _refusal(handler, message: str):
    """UNAUTHENTICATED at once, without reading the request (see `refusal`); unknown
    methods are refused too rather than revealed."""
    return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, message)
