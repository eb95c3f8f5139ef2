"""A real remat server on an ephemeral loopback port, shared by the service tests, and
the `kind` of SDK client a test runs against ("sync": remat.Client, "async":
remat.AsyncClient behind a synchronous facade; see tests/clients.py).

The limits are small enough that over-limit requests are cheap to build, and large
enough for every valid request the tests send (the 20 MiB round trip included).
"""

from __future__ import annotations

import clients
import grpc
import pytest

import remat
from remat_proto.v1 import executor_pb2_grpc
from remat_server import Limits, ServerConfig, create_server

LIMITS = Limits(
    max_nodes=20_000,
    max_edges=200_000,
    max_rank=6,
    # Above every dimension the tests use on purpose, so that [2**40] * 3 trips the
    # element-count check (the one that must not overflow) rather than this one.
    max_dim=1 << 40,
    max_elements=1 << 22,
    max_request_bytes=256 << 20,
)


@pytest.fixture(scope="session")
def server_port():
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, limits=LIMITS))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()


@pytest.fixture(scope="session")
def channel(server_port):
    # Same message ceiling as the SDK's default, so big hand-built requests get through.
    ch = grpc.insecure_channel(
        f"127.0.0.1:{server_port}",
        options=[
            ("grpc.max_receive_message_length", 512 << 20),
            ("grpc.max_send_message_length", 512 << 20),
        ],
    )
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel):
    """The raw generated stub, for sending hand-crafted (malformed) protos."""
    return executor_pb2_grpc.ExecutorStub(channel)


@pytest.fixture(scope="session")
def client(server_port):
    with remat.Client(f"127.0.0.1:{server_port}") as c:
        yield c


@pytest.fixture(params=clients.KINDS)
def kind(request) -> str:
    """Run the test once with remat.Client and once with remat.AsyncClient."""
    return request.param


@pytest.fixture(scope="module", params=clients.KINDS)
def any_client(request, server_port):
    """A client of the shared server, of each kind (see `kind`)."""
    with clients.connect(request.param, f"127.0.0.1:{server_port}") as c:
        yield c
