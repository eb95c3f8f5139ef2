"""TLS, mutual TLS and bearer tokens against real servers on loopback ports.

The certificates (a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate, and an unrelated CA) are made here with `cryptography`, EC P-256 for speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import HANG_SECONDS

import remat
from remat.credentials import make_channel, resolve_token
from remat_proto.v1 import executor_pb2, executor_pb2_grpc
from remat_server import ServerConfig, create_server
from remat_server.service.auth import (
    TokenInterceptor,
    load_tokens,
    server_credentials,
    tls_files_from_env,
    with_security,
)

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN, OTHER_TOKEN = "tok-3f9a1c", "tok-second"
TIMEOUT = HANG_SECONDS


# --- certificates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(cn, key, issuer=None, *, ca=False, usage=None, san=()):
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    data = (
        cert.public_bytes(serialization.Encoding.PEM)
        if cert is not None
        else key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(4)
    )
    ca = _certificate("remat test CA", ca_key, ca=True)
    other = _certificate("unrelated CA", other_key, ca=True)
    server = _certificate(
        "remat server",
        server_key,
        (ca, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")),
    )
    client = _certificate(
        "remat client", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", server),
        server_key=_write(d / "server.key", key=server_key),
        client_cert=_write(d / "client.pem", client),
        client_key=_write(d / "client.key", key=client_key),
        other_ca=_write(d / "other-ca.pem", other),
    )


# --- servers --------------------------------------------------------------------------------
@contextlib.contextmanager
def _serving(**settings):
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, **settings))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@pytest.fixture(scope="module")
def tls_target(pki):
    with _serving(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) as target:
        yield target


@pytest.fixture(scope="module")
def mtls_target(pki):
    with _serving(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    ) as target:
        yield target


@pytest.fixture(scope="module")
def token_target():
    with _serving(auth_tokens=(TOKEN, OTHER_TOKEN)) as target:
        yield target


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch):
    # A REMAT_TOKEN in the developer's shell must not change what these tests see.
    monkeypatch.delenv("REMAT_TOKEN", raising=False)
    monkeypatch.delenv("REMAT_TOKEN_FILE", raising=False)


MODEL = remat.models.mlp(batch=4, widths=(8, 8, 2))


def _run(client: remat.Client):
    return client.run(MODEL.graph, MODEL.inputs, wrt=MODEL.wrt, loss=MODEL.loss)


# The RPCs the token tests exercise: unary ones and a server-streaming one (Compare).
CALLS = {
    "Run": _run,
    "Plan": lambda c: c.plan(MODEL.graph, wrt=MODEL.wrt, loss=MODEL.loss),
    "ListOps": lambda c: c.list_ops(),
    "Compare": lambda c: list(
        c.compare_stream(
            MODEL.graph, MODEL.inputs, wrt=MODEL.wrt, loss=MODEL.loss, policies=["sqrt"]
        )
    ),
}


# --- TLS ------------------------------------------------------------------------------------
def test_tls_round_trip_runs_a_graph(pki, tls_target):
    with remat.Client(
        tls_target, tls=remat.TLS(root_certificates_file=pki.ca), timeout=TIMEOUT
    ) as client:
        result = _run(client)
    assert set(result.grads) == set(MODEL.wrt)
    assert result.outputs["loss"].shape == ()


@pytest.mark.parametrize("case", ["plain text", "untrusted CA", "wrong server name"])
def test_tls_server_refuses_clients_that_cannot_verify_it(pki, tls_target, case):
    tls = {
        "plain text": None,
        "untrusted CA": remat.TLS(root_certificates_file=pki.other_ca),
        "wrong server name": remat.TLS(
            root_certificates_file=pki.ca, server_name_override="elsewhere.example"
        ),
    }[case]
    with remat.Client(tls_target, tls=tls, timeout=TIMEOUT) as client:
        with pytest.raises(remat.UnavailableError) as info:
            client.list_ops()
    assert isinstance(info.value, remat.RematError)


def test_server_name_override_and_pem_bytes(pki, tls_target):
    tls = remat.TLS(root_certificates=Path(pki.ca).read_bytes(), server_name_override="localhost")
    with remat.Client(tls_target, tls=tls, timeout=TIMEOUT) as client:
        assert client.list_ops()


@pytest.mark.parametrize("with_cert, ok", [(False, False), (True, True)])
def test_mutual_tls_requires_a_client_certificate(pki, mtls_target, with_cert, ok):
    cert = {"certificate_file": pki.client_cert, "private_key_file": pki.client_key}
    tls = remat.TLS(root_certificates_file=pki.ca, **(cert if with_cert else {}))
    with remat.Client(mtls_target, tls=tls, timeout=TIMEOUT) as client:
        if ok:
            assert _run(client).grads
        else:
            with pytest.raises(remat.UnavailableError):
                client.list_ops()


# --- tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rpc", sorted(CALLS))
@pytest.mark.parametrize(
    "token, refusal",
    [
        ("", "missing bearer token"),
        ("not-the-token", "invalid bearer token"),
        (TOKEN, None),
        (OTHER_TOKEN, None),  # any configured token authenticates
    ],
)
def test_tokens_guard_every_rpc(token_target, rpc, token, refusal):
    with remat.Client(token_target, token=token, timeout=TIMEOUT) as client:
        if refusal is None:
            assert CALLS[rpc](client)
        else:
            with pytest.raises(remat.UnauthenticatedError, match=refusal) as info:
                CALLS[rpc](client)
            assert info.value.code == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    "metadata, refusal",
    [
        ((("authorization", f"Basic {TOKEN}"),), "malformed authorization"),
        ((("authorization", f"bearer {TOKEN}"),), None),  # the scheme is case-insensitive
    ],
)
def test_authorization_metadata_format(token_target, metadata, refusal):
    with grpc.insecure_channel(token_target) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        call = lambda: stub.ListOps(
            executor_pb2.ListOpsRequest(), metadata=metadata, timeout=TIMEOUT
        )
        if refusal is None:
            assert call().ops
        else:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refusal in info.value.details()
            assert TOKEN not in info.value.details()


def test_unknown_methods_are_refused_before_they_are_revealed(token_target):
    with grpc.insecure_channel(token_target) as channel:
        call = channel.unary_unary("/remat.v1.Executor/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_check_needs_no_token(token_target):
    with grpc.insecure_channel(token_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        first = next(watch)
        watch.cancel()
    assert reply.status == first.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("source", ["REMAT_TOKEN", "REMAT_TOKEN_FILE"])
def test_client_reads_the_token_from_the_environment(token_target, tmp_path, monkeypatch, source):
    if source == "REMAT_TOKEN":
        monkeypatch.setenv("REMAT_TOKEN", TOKEN)
    else:
        (tmp_path / "token").write_text(f"{TOKEN}\n")
        monkeypatch.setenv("REMAT_TOKEN_FILE", str(tmp_path / "token"))
    with remat.Client(token_target, timeout=TIMEOUT) as client:
        assert client.list_ops()
    # An explicit empty token means none, whatever the environment says.
    with remat.Client(token_target, token="", timeout=TIMEOUT) as client:
        with pytest.raises(remat.UnauthenticatedError):
            client.list_ops()


def test_token_and_tls_together(pki):
    config = ServerConfig(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, auth_tokens=(TOKEN,)
    )
    tls = remat.TLS(root_certificates_file=pki.ca)
    with remat.Client.in_process(config, tls=tls, token=TOKEN, timeout=TIMEOUT) as client:
        assert _run(client).grads
        target = client.target
        with remat.Client(target, tls=tls, timeout=TIMEOUT) as anonymous:
            with pytest.raises(remat.UnauthenticatedError, match="missing"):
                anonymous.list_ops()


@pytest.mark.parametrize("secure", [False, True])
def test_aio_channels_carry_the_token(pki, secure):
    settings = dict(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) if secure else {}
    tls = remat.TLS(root_certificates_file=pki.ca) if secure else None

    async def list_ops(target):
        async with make_channel(target, tls=tls, token=TOKEN, aio=True) as channel:
            stub = executor_pb2_grpc.ExecutorStub(channel)
            return await stub.ListOps(executor_pb2.ListOpsRequest(), timeout=TIMEOUT)

    with _serving(auth_tokens=(TOKEN,), **settings) as target:
        assert asyncio.run(list_ops(target)).ops


# --- configuration helpers ------------------------------------------------------------------
def test_load_tokens_from_file_and_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# deploy tokens\n\n  {TOKEN}  \n# rotated out: old\n{OTHER_TOKEN}\n")
    assert load_tokens(str(path)) == (TOKEN, OTHER_TOKEN)
    env = {"REMAT_AUTH_TOKENS": f" {TOKEN}, {OTHER_TOKEN}\nthird "}
    assert load_tokens(environ=env) == (TOKEN, OTHER_TOKEN, "third")
    assert load_tokens(environ={}) == ()
    assert load_tokens(env="OTHER", environ={"OTHER": TOKEN}) == (TOKEN,)


@pytest.mark.parametrize(
    "content, error",
    [
        ("# only a comment\n\n", "holds no token"),
        (None, "cannot read token file"),
        ("two words\n", "line 1: a token cannot contain spaces"),
    ],
)
def test_load_tokens_errors(tmp_path, content, error):
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error) as info:
        load_tokens(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "files, error",
    [
        ({"tls_cert_file": "CERT"}, "tls_key_file is not set"),
        ({"tls_key_file": "KEY"}, "tls_cert_file is not set"),
        ({"tls_client_ca_file": "CA"}, "needs tls_cert_file"),
        ({"tls_cert_file": "missing.pem", "tls_key_file": "KEY"}, "certificate file 'missing.pem'"),
        ({"tls_cert_file": "CERT", "tls_key_file": "NOT_PEM"}, "is not PEM"),
    ],
)
def test_server_credentials_errors_name_the_problem(pki, tmp_path, files, error):
    (tmp_path / "junk").write_text("hello")
    real = {
        "CERT": pki.server_cert,
        "KEY": pki.server_key,
        "CA": pki.ca,
        "NOT_PEM": str(tmp_path / "junk"),
    }
    config = ServerConfig(**{k: real.get(v, v) for k, v in files.items()})
    with pytest.raises(ValueError, match=error):
        server_credentials(config)


def test_security_from_flags_and_environment(pki, tmp_path):
    environ = {
        "REMAT_TLS_CERT_FILE": pki.server_cert,
        "REMAT_TLS_KEY_FILE": "/flag/wins",
        "REMAT_AUTH_TOKENS": TOKEN,
    }
    assert tls_files_from_env(environ) == {
        "tls_cert_file": pki.server_cert,
        "tls_key_file": "/flag/wins",
    }
    config = with_security(ServerConfig(), tls_key_file=pki.server_key, environ=environ)
    assert (config.tls_cert_file, config.tls_key_file) == (pki.server_cert, pki.server_key)
    assert config.auth_tokens == (TOKEN,) and config.tls
    assert server_credentials(config) is not None


def test_bad_tokens_are_rejected_early(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        TokenInterceptor(())
    with pytest.raises(ValueError, match="whitespace"):
        resolve_token("two words")
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("REMAT_TOKEN_FILE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        resolve_token(None)
    with pytest.raises(ValueError, match="private key"):
        remat.TLS(certificate_file="client.pem")
