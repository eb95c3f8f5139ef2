"""Tensor transfer throughput: remat over loopback against a raw TCP socket, same run.

    python bench/transfer.py [--quick] [--sizes 16,64,256,1024] [--repeats 5] [--no-grpc]

For each size N (MiB), the same N bytes go up and come back (2N bytes moved) through:

- raw TCP: a plain socket to another process, which receives all N bytes into a
  preallocated buffer, then sends them back; the client sends from a thread while the
  main thread `recv_into`s a preallocated buffer (the best simple Python TCP);
- grpc echo (unless --no-grpc): a bare gRPC bidi stream of 1 MiB `bytes` messages
  to a server that gathers them, then streams them back (gRPC's own ceiling);
- remat: `Client.run` of the identity graph `y = x` (float32) on a remat server in
  its own process; the SDK picks RunStream above `remat.calls.STREAM_THRESHOLD_BYTES`
  (auto), and the other path is forced where it can carry the tensor.

Servers run in their own processes: an in-process server shares the client's GIL.
Per size, the baselines and the SDK's own path are interleaved --repeats times; the
forced path runs after them (until --repeats runs or 20 s). The best run of each is
compared. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np

import remat
import remat.calls

MiB = 1 << 20
CHUNK = 1 << 20  # the SDK's and the server's stream chunk
MAX_MESSAGE = 512 * MiB  # client and server default max message size
GOAL_RATIO, GOAL_MIN_MIB = 0.5, 64
FORCED_BUDGET_SECONDS = 20.0
FRESH_TCP = "raw tcp, fresh receive buffer"
REUSING = "remat auto, out= (reused result)"  # forced-path repeats stop once they add up to this
ECHO_METHOD = "/bench.Echo/Echo"
_HEADER = struct.Struct("<Q")

# A remat server for `started`: prints its port, serves until stdin closes.
REMAT_SERVER = """
import sys
from remat_server import ServerConfig, create_server
server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(None).wait()
"""


# --- server processes ------------------------------------------------------------------------
@contextlib.contextmanager
def started(code: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`python -c code` in a new process; `code` prints its ports on one line (see
    `read_ports`), then serves until its stdin closes, which leaving this context does
    (and our own exit would do)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_ports(proc: subprocess.Popen) -> list[int]:
    """Wait until a `started` server listens; its ports."""
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server process exited with {proc.wait()} before listening")
    return [int(port) for port in line.split()]


# --- the baselines' server side (in its own process) -------------------------------------
class _Buffers:
    """Preallocated receive buffers, one per size (tcp and grpc take turns)."""

    def __init__(self):
        self._by_size: dict[int, memoryview] = {}

    def get(self, nbytes: int) -> memoryview:
        if nbytes not in self._by_size:
            self._by_size.clear()  # one buffer at a time: they may be 1 GiB
            self._by_size[nbytes] = memoryview(bytearray(nbytes))
        return self._by_size[nbytes]


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        n = sock.recv_into(view[received:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        received += n


def _tcp_connection(conn: socket.socket, buffers: _Buffers) -> None:
    """Per message: an 8-byte length N, N bytes in; then the same N bytes out."""
    header = memoryview(bytearray(_HEADER.size))
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                recv_exactly(conn, header)
            except ConnectionError:
                return
            (nbytes,) = _HEADER.unpack(header)
            view = buffers.get(nbytes)[:nbytes]
            recv_exactly(conn, view)
            conn.sendall(view)


def _grpc_echo(buffers: _Buffers):
    def echo(requests, context):
        """First message: N as 8 bytes; then N bytes of chunks, gathered; then sent back."""
        requests = iter(requests)
        (nbytes,) = _HEADER.unpack(next(requests))
        view, received = buffers.get(nbytes)[:nbytes], 0
        for chunk in requests:
            view[received : received + len(chunk)] = chunk
            received += len(chunk)
        for start in range(0, nbytes, CHUNK):
            yield bytes(view[start : start + CHUNK])

    return echo


def serve_baseline() -> None:
    """The baseline server process: raw TCP and a bare gRPC echo; prints both ports."""
    buffers = _Buffers()
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_tcp_connection, args=(conn, buffers), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(_grpc_echo(buffers))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(listener.getsockname()[1], grpc_port, flush=True)
    sys.stdin.read()
    server.stop(None)


_BASELINE_SERVER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    "from transfer import serve_baseline; serve_baseline()"
)


# --- the contenders (client side) ----------------------------------------------------------
def tcp_round_trip(sock: socket.socket, data: memoryview, out: memoryview) -> None:
    """Send `data` (from a thread) while receiving the echo into `out`: full duplex."""

    def send():
        sock.sendall(_HEADER.pack(len(data)))
        sock.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    recv_exactly(sock, out)
    sender.join()


def grpc_round_trip(call, data: memoryview, out: memoryview) -> None:
    def messages():
        yield _HEADER.pack(len(data))
        for start in range(0, len(data), CHUNK):
            yield bytes(data[start : start + CHUNK])

    received = 0
    for chunk in call(messages()):
        out[received : received + len(chunk)] = chunk
        received += len(chunk)
    if received != len(data):
        raise RuntimeError(f"grpc echo returned {received} of {len(data)} bytes")


def identity_graph(nbytes: int) -> remat.Graph:
    g = remat.Graph(f"identity_{nbytes}")
    g.output("y", g.input("x", (nbytes // 4,), "float32"))
    return g


@contextlib.contextmanager
def stream_threshold(nbytes: int):
    """Force the SDK's choice: RunStream above `nbytes` (e.g. huge: always unary)."""
    saved = remat.calls.STREAM_THRESHOLD_BYTES
    remat.calls.STREAM_THRESHOLD_BYTES = nbytes
    try:
        yield
    finally:
        remat.calls.STREAM_THRESHOLD_BYTES = saved


def remat_round_trip(
    client: remat.Client,
    graph: remat.Graph,
    x: np.ndarray,
    threshold: int | None,
    server_seconds: list[float],
) -> np.ndarray:
    with stream_threshold(threshold) if threshold is not None else contextlib.nullcontext():
        result = client.run(graph, {"x": x})
    server_seconds.append(result.metrics.total_seconds)
    return result.outputs["y"]


def remat_reusing(
    client: remat.Client, graph: remat.Graph, x: np.ndarray, held: dict, server_seconds: list[float]
) -> np.ndarray:
    """The SDK's own path receiving into the previous call's result (`out=`), as the
    baselines receive into their preallocated buffers."""
    previous = held.get("result")
    if previous is not None:
        y = previous.outputs["y"]
        y[:1] = y[-1:] = 0  # so a stale result cannot pass the check
    result = client.run(graph, {"x": x}, out=previous)
    held["result"] = result
    server_seconds.append(result.metrics.total_seconds)
    return result.outputs["y"]


def fresh_tcp_round_trip(sock: socket.socket, data: memoryview) -> np.ndarray:
    """Raw TCP receiving into fresh memory, as a NumPy result array would be."""
    out = np.empty(len(data), np.uint8)
    tcp_round_trip(sock, data, memoryview(out))
    return out.view(np.float32)


def remat_paths(nbytes: int) -> list[tuple[str, int | None]]:
    """(label, threshold override) of the remat rows for a size: the SDK's own choice,
    then the other path where it can carry the tensor (unary: one message each way)."""
    streams = nbytes > remat.calls.STREAM_THRESHOLD_BYTES
    rows = [(f"remat auto ({'stream' if streams else 'unary'})", None)]
    if not streams:
        rows.append(("remat stream (forced)", -1))
    elif nbytes + MiB <= MAX_MESSAGE:  # the server keeps 1 MiB of a message for the rest
        rows.append(("remat unary (forced)", 1 << 62))
    return rows


# --- measuring -----------------------------------------------------------------------------
def measure(
    size_mib: float,
    repeats: int,
    tcp: socket.socket,
    echo,
    client: remat.Client,
    log: Callable[[str], None],
) -> list[dict]:
    """The rows of one size: best of `repeats`, contenders interleaved."""
    nbytes = int(size_mib * MiB) // 4 * 4
    x = np.arange(1, nbytes // 4 + 1, dtype=np.float32)  # no zero: a zeroed buffer never passes
    data = memoryview(x.reshape(-1).view(np.uint8))
    out = memoryview(bytearray(nbytes))  # the baselines' preallocated receive buffer
    graph = identity_graph(nbytes)
    client.register(graph)  # run by id from the first timed call on
    server_seconds: dict[str, list[float]] = {}
    steps: dict[str, Callable[[], None]] = {"raw tcp": lambda: tcp_round_trip(tcp, data, out)}
    if echo is not None:
        steps["grpc echo"] = lambda: grpc_round_trip(echo, data, out)
    steps[FRESH_TCP] = lambda: fresh_tcp_round_trip(tcp, data)
    forced: dict[str, Callable[[], None]] = {}
    for label, threshold in remat_paths(nbytes):
        server_seconds[label] = []
        (forced if threshold is not None else steps)[label] = (
            lambda t=threshold, s=server_seconds[label]: remat_round_trip(client, graph, x, t, s)
        )
    held: dict = {}
    server_seconds[REUSING] = []
    remat_reusing(client, graph, x, held, [])  # its first result, to reuse from then on
    steps[REUSING] = lambda: remat_reusing(client, graph, x, held, server_seconds[REUSING])
    seconds: dict[str, list[float]] = {label: [] for label in (*steps, *forced)}

    def timed(label: str, step: Callable[[], None]) -> None:
        out[:4] = out[-4:] = bytes(4)  # so a stale buffer cannot pass the check
        start = time.perf_counter()
        result = step()
        seconds[label].append(time.perf_counter() - start)
        echoed = result if result is not None else np.frombuffer(out, np.float32)
        if not np.array_equal(echoed, x):
            raise RuntimeError(f"{label}, {size_mib:g} MiB: the bytes came back different")

    for _ in range(repeats):  # the baselines and the SDK's own path, interleaved
        for label, step in steps.items():
            timed(label, step)
        log(
            f"  {size_mib:g} MiB: "
            + ", ".join(f"{label} {seconds[label][-1]:.3f} s" for label in steps)
        )
    # The forced path after them: it is slow, and a big unary call leaves the server and
    # the client slower for the next call (see bench/README.md).
    for label, step in forced.items():
        while len(seconds[label]) < repeats and sum(seconds[label]) < FORCED_BUDGET_SECONDS:
            timed(label, step)
        log(f"  {size_mib:g} MiB: {label} " + ", ".join(f"{s:.3f}" for s in seconds[label]))
    tcp_best = min(seconds["raw tcp"])
    rows = []
    for label, samples in seconds.items():
        best = min(samples)
        server = server_seconds.get(label)
        rows.append(
            dict(
                size_mib=size_mib,
                nbytes=nbytes,
                path=label,
                seconds=best,
                gb_per_s=2 * nbytes / best / 1e9,
                ratio_to_tcp=tcp_best / best,
                server_seconds=server[samples.index(best)] if server else None,
                samples=samples,
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| size | path | runs | best ms | median ms | GB/s (best) | vs raw TCP | server ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        server = "—" if r["server_seconds"] is None else f"{r['server_seconds'] * 1e3:.1f}"
        lines.append(
            f"| {r['size_mib']:g} MiB | {r['path']} | {len(r['samples'])} | "
            f"{r['seconds'] * 1e3:.1f} | "
            f"{statistics.median(r['samples']) * 1e3:.1f} | {r['gb_per_s']:.2f} | "
            f"{100 * r['ratio_to_tcp']:.0f}% | {server} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> tuple[bool | None, str]:
    """Whether remat reaches GOAL_RATIO of raw TCP at every size >= 64 MiB, like for
    like: receiving into memory it already has (`out=`), as the raw TCP client and
    every server here do. The SDK's default, a fresh result array per call, is reported
    beside it against raw TCP receiving into fresh memory too."""

    def ratios(path: str, baseline: str) -> list[tuple[float, float]]:
        best = {r["size_mib"]: r["seconds"] for r in rows if r["path"] == baseline}
        return [
            (r["size_mib"], best[r["size_mib"]] / r["seconds"])
            for r in rows
            if r["path"] == path and r["size_mib"] >= GOAL_MIN_MIB and r["size_mib"] in best
        ]

    def spelled(pairs) -> str:
        return ", ".join(f"{size:g} MiB {100 * ratio:.0f}%" for size, ratio in pairs)

    reusing = ratios(REUSING, "raw tcp")
    if not reusing:
        return None, f"no size >= {GOAL_MIN_MIB} MiB measured: goal not evaluated"
    met = min(ratio for _, ratio in reusing) >= GOAL_RATIO
    line = (
        f"remat receiving into its previous result (out=) at >= {GOAL_MIN_MIB} MiB: "
        f"{spelled(reusing)} of raw TCP; goal >= {100 * GOAL_RATIO:.0f}%: "
        f"{'MET' if met else 'NOT MET'}"
    )
    fresh = [(size, ratio) for size, ratio in ratios(FRESH_TCP, "raw tcp")]
    default = [
        pair
        for r in rows
        if r["path"].startswith("remat auto (")
        for pair in ratios(r["path"], FRESH_TCP)
        if pair[0] == r["size_mib"]
    ]
    if default:
        line += (
            f"\nthe SDK's default (a new result array per call): {spelled(default)} of "
            f"raw TCP receiving into fresh memory (which itself runs at "
            f"{spelled(fresh)} of raw TCP)"
        )
    return met, line


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 MiB only")
    parser.add_argument(
        "--sizes", help="comma-separated MiB (default 16,64,256,1024; --quick 16,64)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per row, interleaved; the best is compared (default 5)",
    )
    parser.add_argument("--no-grpc", action="store_true", help="skip the bare gRPC echo row")
    parser.add_argument("--verbose", action="store_true", help="print every run to stderr")
    args = parser.parse_args(argv)
    sizes = [
        float(s) for s in (args.sizes or ("16,64" if args.quick else "16,64,256,1024")).split(",")
    ]

    def log(line: str) -> None:
        if args.verbose:
            print(line, file=sys.stderr)

    print(f"# tensor transfer: remat vs raw loopback TCP (best of {args.repeats})\n")
    print(
        f"python {platform.python_version()}, grpcio {grpc.__version__}, protobuf "
        f"{metadata.version('protobuf')}, numpy {np.__version__}, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at start); "
        f"SDK stream threshold {remat.calls.STREAM_THRESHOLD_BYTES / MiB:g} MiB, "
        f"chunks {CHUNK // 1024} KiB. Bytes moved = 2 x size (up and back).\n"
    )
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        # Both servers start at once (each takes a second or so to import).
        baseline = stack.enter_context(started(_BASELINE_SERVER))
        server = stack.enter_context(started(REMAT_SERVER))
        (tcp_port, echo_port), (port,) = read_ports(baseline), read_ports(server)
        tcp = stack.enter_context(socket.create_connection(("127.0.0.1", tcp_port)))
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        echo = None
        if not args.no_grpc:
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{echo_port}"))
            echo = channel.stream_stream(ECHO_METHOD)
        client = stack.enter_context(remat.Client(f"127.0.0.1:{port}"))
        for size in sizes:
            rows += measure(size, args.repeats, tcp, echo, client, log)
    met, line = summary(rows)
    print(table(rows))
    print(f"\n{line}")
    return {"rows": rows, "goal_met": met, "summary": line, "repeats": args.repeats}


if __name__ == "__main__":
    main(sys.argv[1:])
