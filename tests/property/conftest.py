"""One real server for the property tests, on an ephemeral loopback port, with limits
small enough that every request the fuzzers can build is cheap to refuse or to run:
a tensor holds at most 4,096 elements, so anything the server allocates beyond a few
MiB was allocated before a limit was checked (the RSS guard below catches that).
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path

import fuzz_support
import grpc
import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from remat_proto.v1 import executor_pb2_grpc
from remat_server import Limits, ServerConfig, create_server

# Hypothesis keeps caches (and would keep its example database, which fuzz_settings
# turns off) in ./.hypothesis; nothing of it belongs in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "remat-hypothesis")

LIMITS = Limits(
    max_nodes=64,
    max_edges=256,
    max_rank=5,
    max_dim=1 << 16,
    max_elements=1 << 12,
    max_request_bytes=4 << 20,
    optimal_max_nodes=40,
    optimal_time_limit=1.0,
)
CONFIG = ServerConfig(
    host="127.0.0.1",
    port=0,
    max_message_bytes=4 << 20,
    max_workers=4,
    graph_cache_bytes=64 << 10,
    limits=LIMITS,
)
RSS_GROWTH_MIB = 256  # peak RSS the whole property run may add

METHODS = ("Run", "Plan", "Differentiate", "RegisterGraph", "ListOps")


@pytest.fixture(scope="session")
def fuzz_port():
    server, port = create_server(CONFIG)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()


@pytest.fixture(scope="session")
def fuzz_channel(fuzz_port):
    channel = grpc.insecure_channel(f"127.0.0.1:{fuzz_port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def fuzz_stub(fuzz_channel):
    return executor_pb2_grpc.ExecutorStub(fuzz_channel)


@pytest.fixture(scope="session")
def raw_methods(fuzz_channel):
    """Method name -> a callable sending raw bytes and returning raw bytes."""
    methods = {
        name: fuzz_channel.unary_unary(
            f"/remat.v1.Executor/{name}", request_serializer=None, response_deserializer=None
        )
        for name in METHODS
    }
    methods["Compare"] = fuzz_channel.unary_stream(
        "/remat.v1.Executor/Compare", request_serializer=None, response_deserializer=None
    )
    return methods


def pytest_terminal_summary(terminalreporter):
    counts = fuzz_support.COUNTS
    if counts["cases"]:
        terminalreporter.write_line(
            f"property tests: {counts['cases']:,} generated cases, "
            f"{counts['calls']:,} calls to the server"
        )


@pytest.fixture(scope="session")
def _rss_start():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(autouse=True)
def no_big_allocation(_rss_start, fuzz_stub):
    """After each property test: the server still answers a valid Run correctly, and
    the process never allocated anything the limits should have refused."""
    yield
    fuzz_support.assert_still_serving(fuzz_stub)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _rss_start) / 1024
    assert grown < RSS_GROWTH_MIB, f"peak RSS grew by {grown:.0f} MiB during the fuzzing"
