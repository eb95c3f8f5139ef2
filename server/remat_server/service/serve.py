"""The `remat serve` process: start, announce, drain on SIGTERM, exit; or supervise N
forked workers that share one port.

One process (`workers=1`): build the server, start it, print the "listening" line and
wait for SIGTERM or SIGINT. Then health turns NOT_SERVING, new RPCs are refused, and
in-flight ones get `grace` seconds before they are cancelled; the exit code is 0. A
second signal cancels what is left at once.

N processes (`workers=N`): NumPy work holds the GIL often enough that one process
cannot use several cores, so the parent forks N workers that each run the one-process
path on the same port (SO_REUSEPORT: the kernel spreads connections among them). gRPC
does not survive a fork once its core has started (threads, pollers), so the parent
forks before it creates any gRPC object and never creates one afterwards; it only
reserves the port, forwards signals, serves the workers' aggregated Prometheus metrics
(multiprocess mode, files in PROMETHEUS_MULTIPROC_DIR) and reaps. A worker that dies is
logged and not replaced. The exit code is 0 only if every worker exited 0. Workers
get signals only from the parent (their own process group), and drain and exit if
the parent dies.

    from remat_server import ServerConfig
    from remat_server.serve import serve
    sys.exit(serve(ServerConfig(host="0.0.0.0", port=50051), workers=4, metrics_port=9464))

which is `remat serve --host 0.0.0.0 --workers 4 --metrics-port 9464`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from . import memory_budget
from .config import ServerConfig

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# After the grace period, how long cancelled handlers may run before the process exits
# without them (a worker's parent waits twice as long, then SIGKILLs it).
KILL_AFTER_GRACE = 5.0


def serve(
    config: ServerConfig,
    *,
    workers: int = 1,
    grace: float = 10.0,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    ready: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit code.

    `metrics_port`: None serves no metrics, 0 a free port (printed), else that port.
    `ready(port)` is called once the server (every worker) accepts connections. It owns
    the process: call it from the main thread (it installs signal handlers), and exit
    when it returns (a handler still running a few seconds later is abandoned).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return _serve_one(config, grace, metrics_port, metrics_host, ready, announce=True)
    return _serve_workers(config, workers, grace, metrics_port, metrics_host, ready)


def _serve_one(
    config: ServerConfig,
    grace: float,
    metrics_port: int | None,
    metrics_host: str,
    ready: Callable[[int], None] | None,
    *,
    announce: bool,
) -> int:
    from .app import create_server

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in SIGNALS}
    # A worker is forked with these blocked, so that no signal lands between the fork
    # and the handlers above; from here on they are welcome.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        server, port = create_server(config)
        server.start()
        line = f"remat server listening on {config.host}:{port}"
        if metrics_port is not None:
            bound = server.metrics.start_http_server(metrics_port, metrics_host)
            line += f"; metrics on http://{_url_host(metrics_host)}:{bound}/metrics"
        line += f"; {server.describe_budget()}"
        if announce:
            print(line, flush=True)
        if ready is not None:
            ready(port)
        stop.wait()
        # A second signal cancels the in-flight RPCs now instead of after the grace.
        # (In a thread: grpc's stop blocks, and a handler must not.)
        for sig in SIGNALS:
            signal.signal(
                sig,
                lambda *_: threading.Thread(target=server.stop, args=(None,), daemon=True).start(),
            )
        server.shutdown(grace)
        _exit_anyway_after(KILL_AFTER_GRACE, 0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_anyway_after(seconds: float, code: int) -> None:
    """gRPC has stopped, but a cancelled handler runs on until the executor's next step
    checks for cancellation (a long planner solve or a huge op may not check for a
    while), and the interpreter waits for such threads at exit. Exit without them if
    they are still running `seconds` from now: the process must not outlive its grace
    by much (a supervisor would SIGKILL it). A daemon timer: it cannot delay the exit."""

    def hard_exit() -> None:
        log.warning(
            "remat serve: handler threads still running %.0f s after shutdown; "
            "exiting without them",
            seconds,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


def _serve_workers(
    config: ServerConfig,
    workers: int,
    grace: float,
    metrics_port: int | None,
    metrics_host: str,
    ready: Callable[[int], None] | None,
) -> int:
    if threading.active_count() > 1:
        # fork copies only this thread; locks other threads held stay held.
        log.warning(
            "remat serve: forking workers while %d other threads run", threading.active_count() - 1
        )
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="remat-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)
    _prometheus_multiprocess_mode()
    # The machine's memory is shared by the workers: decided here, once, for all of them.
    config, budget = memory_budget.resolve(config, workers)
    try:
        with _reserve_port(config.host, config.port) as (port, reserved):
            config = dataclasses.replace(config, port=port, reuse_port=True)
            return _supervise(
                config, workers, grace, metrics_port, metrics_host, ready, reserved, budget
            )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _supervise(
    config: ServerConfig,
    workers: int,
    grace: float,
    metrics_port: int | None,
    metrics_host: str,
    ready: Callable[[int], None] | None,
    reserved: socket.socket,
    budget: memory_budget.Budget | None,
) -> int:
    live: set[int] = set()
    stopping: list[float] = []  # monotonic time of the first stop signal

    def forward(signum, _frame):
        if not stopping:
            stopping.append(time.monotonic())
        for pid in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    read_end, write_end = os.pipe()  # workers -> parent: "accepting connections"
    life_read, life_write = os.pipe()  # held by the parent only: EOF when it dies
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    previous = {}
    try:
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                for fd in (read_end, life_write):
                    os.close(fd)
                reserved.close()
                _worker(config, grace, write_end, life_read)
            live.add(pid)
        previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    os.close(write_end)
    os.close(life_read)
    try:
        pids = sorted(live)
        # Each worker writes one byte once it accepts connections; EOF before N bytes
        # means a worker died while starting (its error is on stderr).
        started = 0
        with os.fdopen(read_end, "rb") as pipe:
            while started < workers and pipe.read(1):
                started += 1
        codes: dict[int, int] = {}
        if started < workers:
            log.error(
                "remat serve: %d of %d workers failed to start; stopping",
                workers - started,
                workers,
            )
            forward(signal.SIGTERM, None)
        elif not stopping:
            line = (
                f"remat server listening on {config.host}:{config.port} "
                f"({workers} workers, pids {', '.join(map(str, pids))})"
            )
            if metrics_port is not None:
                from .metrics import start_multiprocess_http_server

                bound = start_multiprocess_http_server(metrics_port, metrics_host)
                line += f"; metrics on http://{_url_host(metrics_host)}:{bound}/metrics"
            if budget is not None:
                line += f"; memory budget per worker {budget.explain()}"
            print(line, flush=True)
            if ready is not None:
                ready(config.port)
        _reap(live, codes, stopping, grace)
        return 0 if started == workers and all(c == 0 for c in codes.values()) else 1
    finally:
        os.close(life_write)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reap(live: set[int], codes: dict[int, int], stopping: list[float], grace: float) -> None:
    """Wait for every worker; kill those still running well after the grace period."""
    from .metrics import mark_process_dead

    while live:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if stopping and time.monotonic() - stopping[0] > grace + 2 * KILL_AFTER_GRACE:
                for pid in list(live):
                    log.error("remat serve: worker %d did not stop; killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stopping[0] = float("inf")
            time.sleep(0.05)
            continue
        if pid not in live:
            continue
        live.discard(pid)
        codes[pid] = code = os.waitstatus_to_exitcode(status)
        mark_process_dead(pid)
        if not stopping:
            log.error(
                "remat serve: worker %d exited unexpectedly (%s); %d still serving",
                pid,
                f"exit code {code}" if code >= 0 else signal.Signals(-code).name,
                len(live),
            )


def _worker(config: ServerConfig, grace: float, ready_fd: int, lifeline_fd: int) -> None:
    code = 1
    try:
        # Signals reach workers only through the parent, each once: Ctrl-C in a
        # terminal (sent to the whole foreground group) would otherwise arrive twice,
        # and a second signal means "cancel now".
        os.setpgid(0, 0)

        def orphaned() -> None:  # the parent died (SIGKILL): drain and exit too
            while os.read(lifeline_fd, 1):
                pass
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=orphaned, name="remat-lifeline", daemon=True).start()

        def ready(_port: int) -> None:
            os.write(ready_fd, b".")
            os.close(ready_fd)

        code = _serve_one(config, grace, None, "", ready, announce=False)
    except BaseException:  # noqa: BLE001 - a worker reports everything, then exits
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Never unwind into the parent's stack (the CLI, a test runner) in a child.
        os._exit(code)


def _prometheus_multiprocess_mode() -> None:
    """prometheus_client picks its value class (per process, or mmapped files shared
    through PROMETHEUS_MULTIPROC_DIR) when it is imported. If it was imported before
    the variable was set, pick again: metrics created from now on (the workers' are
    created after the fork) then write to the shared directory."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None and values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[tuple[int, socket.socket]]:
    """Bind (not listen on) `host:port` with SO_REUSEPORT, so that port 0 becomes one
    concrete free port that the workers all bind, and nobody else takes it meanwhile."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        yield sock.getsockname()[1], sock
    finally:
        sock.close()


def _url_host(host: str) -> str:
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host
