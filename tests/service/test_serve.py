"""`remat serve` as a real process: graceful SIGTERM, the grace deadline, --workers N
(forked processes sharing one port, aggregated Prometheus metrics) and the flags that
build its ServerConfig.

Every server here is a subprocess on a free port; every wait has a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from served import CLI, LINUX_PROC, Served

import remat
from remat import retries

# How long a multi-worker server may take to exit on a loaded machine (the tests check
# its exit code; the single-process ones check promptness).
EXIT_SECONDS = 30


def client(served: Served, timeout: float = 30, **options) -> remat.Client:
    # No retries: a refusal must show up as the error it is, at once.
    return remat.Client(
        served.target, timeout=timeout, retry=retries.NO_RETRY, options=list(options.items())
    )


def slow_chain(n: int, steps: int, seed: int = 0):
    """y <- tanh(y @ P) `steps` times, P a permutation matrix: full matmul cost on the
    server, while the answer is exact and cheap here (a column permutation)."""
    g = remat.Graph("slow")
    y = g.input("x", (n, n), "float64")
    w = g.input("w", (n, n), "float64")
    for _ in range(steps):
        y = remat.tanh(y @ w)
    g.output("y", y)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    p = np.zeros((n, n))
    p[perm, np.arange(n)] = 1.0  # (v @ p)[:, j] = v[:, perm[j]]
    inputs = {"x": rng.standard_normal((n, n)), "w": p}
    expected = inputs["x"]
    for _ in range(steps):
        expected = np.tanh(expected[:, perm])
    return g, inputs, expected


def small_graph():
    g = remat.Graph("small")
    x = g.input("x", (3,), "float64")
    g.output("loss", remat.sum(x * x))
    return g


def in_thread(fn):
    """Run `fn()` in a thread; returns a dict that gets `value` or `error`, and `at`."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except Exception as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_sigterm_drains_in_flight_run_refuses_new_ones_and_exits_zero():
    graph, inputs, expected = slow_chain(500, 250)  # ~1.7 s of matmuls
    with Served("--grace", "20", "--metrics-port", "0") as served:
        # A load balancer's view: a health Watch stream, open before the signal.
        channel = grpc.insecure_channel(served.target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        baseline = served.inflight()  # the Watch itself

        with client(served) as slow:
            run = in_thread(lambda: slow.run(graph, inputs))
            served.wait_until_busy(baseline)
            signalled = served.terminate()

            # Health turns NOT_SERVING for whoever watches; the watcher then hangs up
            # (an open Watch would otherwise hold the server for the whole grace).
            status = next(watch).status  # the Watch has its own 30 s deadline
            watch.cancel()
            channel.close()
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING

            # A new request while the old one drains is refused. (Not at once: a call
            # that reaches gRPC core in the instant its shutdown begins is CANCELLED
            # by core, not UNAVAILABLE; after it, the listener is closed.)
            time.sleep(0.2)
            with client(served, timeout=5) as late:
                with pytest.raises(remat.UnavailableError):
                    late.run(small_graph(), {"x": np.ones(3)})
            refused = time.monotonic()
            assert run["thread"].is_alive(), "the slow run finished too soon to test draining"

            run["thread"].join(timeout=30)
        assert "error" not in run, run.get("error")
        assert run["at"] > refused > signalled
        np.testing.assert_allclose(run["value"].outputs["y"], expected, rtol=1e-12, atol=0)

        assert served.wait(timeout=10) == 0, served.stderr
        # It left as soon as the run was done, not at the end of the 20 s grace.
        assert time.monotonic() - run["at"] < 5


def test_grace_expiry_cancels_the_run_and_still_exits_zero_promptly():
    graph, inputs, _ = slow_chain(700, 600)  # ~10 s uncancelled
    with Served("--grace", "0.5", "--metrics-port", "0") as served:
        baseline = served.inflight()
        with client(served) as slow:
            run = in_thread(lambda: slow.run(graph, inputs))
            served.wait_until_busy(baseline)
            signalled = served.terminate()
            run["thread"].join(timeout=15)
            assert not run["thread"].is_alive(), "the client hung after the grace period"
        assert isinstance(run.get("error"), (remat.CancelledError, remat.UnavailableError)), run
        assert run["at"] - signalled < 4
        assert served.wait(timeout=6) == 0, served.stderr
        assert time.monotonic() - signalled < 6


GRPC_THREADS = {"grpc_global_tim", "event_engine", "lifeguard"}


def _thread_names(pid: int) -> set[str]:
    names = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as f:
            names.add(f.read().strip())
    return names


def _listening_connections(port: int, pids: list[int]) -> dict[int, int]:
    """Established server-side TCP connections on `port`, counted per worker pid (Linux:
    /proc/net/tcp gives the sockets, /proc/PID/fd who holds them)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    counts = {}
    for pid in pids:
        held = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                held.add(link[8:-1])
        counts[pid] = len(held & inodes)
    return counts


def _rpc_counts(samples, method: str) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "remat_rpc_duration_seconds_count" and ("method", method) in labels
    )


@pytest.mark.skipif(not LINUX_PROC, reason="needs /proc to see which worker holds a connection")
def test_workers_share_the_port_aggregate_metrics_and_stop_together():
    with Served("--workers", "2", "--metrics-port", "0", "--grace", "5") as served:
        assert len(served.worker_pids) == 2, served.line
        # Fork safety: gRPC core never started in the parent (its native threads are
        # named), only in the workers, which were forked before any gRPC object existed.
        assert not GRPC_THREADS & _thread_names(served.process.pid)
        for pid in served.worker_pids:
            assert GRPC_THREADS & _thread_names(pid)
        # Separate connections (no shared subchannel pool): the kernel spreads them over
        # the workers by hash, so keep opening until both hold some (1 in 2**k to fail).
        clients, runs = [], 0
        try:
            for _ in range(40):
                c = client(served, timeout=10, **{"grpc.use_local_subchannel_pool": 1})
                clients.append(c)
                result = c.run(
                    small_graph(), {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss"
                )
                runs += 1
                assert float(result.outputs["loss"]) == 14.0
                np.testing.assert_array_equal(result.grads["x"], [2.0, 4.0, 6.0])
                per_worker = _listening_connections(served.port, served.worker_pids)
                if runs >= 4 and all(per_worker.values()):
                    break
            assert all(per_worker.values()), per_worker
        finally:
            for c in clients:
                c.close()

        # One endpoint, the sum over both workers' files.
        deadline = time.monotonic() + 5
        while _rpc_counts(served.metrics(), "Run") < runs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rpc_counts(served.metrics(), "Run") == runs

        signalled = served.terminate()
        assert served.wait(timeout=EXIT_SECONDS) == 0, served.stderr
        assert time.monotonic() - signalled < 5
    for pid in served.worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "unexpectedly" not in served.stderr


def test_a_dead_worker_is_reported_the_rest_serve_and_the_exit_code_says_so():
    with Served("--workers", "2", "--grace", "2") as served:
        victim, survivor = served.worker_pids
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "unexpectedly" not in served.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"worker {victim} exited unexpectedly (SIGKILL); 1 still serving" in served.stderr
        with client(served, timeout=10) as c:
            assert float(c.run(small_graph(), {"x": np.ones(3)}).outputs["loss"]) == 3.0
        served.terminate()
        assert served.wait(timeout=EXIT_SECONDS) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


@pytest.mark.skipif(not LINUX_PROC, reason="needs /proc")
def test_ctrl_c_to_the_process_group_drains_workers_once():
    """A terminal sends SIGINT to the whole foreground group. Workers must see it once
    (from the parent): a second signal would mean "cancel now"."""
    graph, inputs, expected = slow_chain(500, 250)
    with Served("--workers", "2", "--metrics-port", "0", "--grace", "20") as served:
        baseline = served.inflight()
        with client(served) as slow:
            run = in_thread(lambda: slow.run(graph, inputs))
            served.wait_until_busy(baseline)
            os.killpg(served.process.pid, signal.SIGINT)
            run["thread"].join(timeout=30)
        assert "error" not in run, run.get("error")
        np.testing.assert_allclose(run["value"].outputs["y"], expected, rtol=1e-12, atol=0)
        assert served.wait(timeout=EXIT_SECONDS) == 0, served.stderr


def test_workers_drain_and_exit_when_the_parent_is_killed():
    with Served("--workers", "2") as served:
        served.process.kill()
        served.process.wait(timeout=5)
        deadline = time.monotonic() + 10
        alive = list(served.worker_pids)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            time.sleep(0.05)
        assert not alive, f"workers outlived their parent: {alive}"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# --- flags -> ServerConfig -----------------------------------------------------------------
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _config(argv, environ=None):
    from remat_server.service.flags import build_parser, server_config

    return server_config(build_parser({}).parse_args(argv), environ=environ or {})


def test_token_file_and_tls_flags_reach_the_config(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nalpha\n\nbeta\n")
    files = {}
    for name in ("cert", "key", "ca"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(PEM)
    config = _config(
        [
            "--token-file",
            str(tokens),
            "--tls-cert-file",
            str(files["cert"]),
            "--tls-key-file",
            str(files["key"]),
            "--tls-client-ca-file",
            str(files["ca"]),
        ],
        environ={"REMAT_AUTH_TOKENS": "ignored-when-a-file-is-named"},
    )
    assert config.auth_tokens == ("alpha", "beta")
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
        str(files["cert"]),
        str(files["key"]),
        str(files["ca"]),
    )
    assert config.tls

    # Without flags: tokens and TLS paths from the environment; flags win over it.
    config = _config(
        [],
        environ={
            "REMAT_AUTH_TOKENS": "gamma, delta",
            "REMAT_TLS_CERT_FILE": str(files["cert"]),
            "REMAT_TLS_KEY_FILE": str(files["key"]),
        },
    )
    assert config.auth_tokens == ("gamma", "delta")
    assert config.tls_cert_file == str(files["cert"]) and not config.tls_client_ca_file
    config = _config(
        ["--tls-cert-file", str(files["ca"]), "--tls-key-file", str(files["key"])],
        environ={"REMAT_TLS_CERT_FILE": str(files["cert"])},
    )
    assert config.tls_cert_file == str(files["ca"])

    # Neither: no authentication, no TLS.
    config = _config([])
    assert config.auth_tokens == () and not config.tls


def test_process_flags():
    from remat_server.service.flags import build_parser

    assert _config(["--workers-threads", "3"]).max_workers == 3  # deprecated alias
    assert _config(["--threads", "5"]).max_workers == 5
    assert _config(["--workers", "2"]).reuse_port and not _config([]).reuse_port
    args = build_parser({}).parse_args([])
    assert (args.workers, args.metrics_port, args.metrics_host) == (1, None, None)
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["--workers", "0"])
    # No flag takes a secret itself.
    serve = build_parser({})
    flags = {option for action in serve._actions for option in action.option_strings}
    assert not {"--token", "--tokens", "--auth-token", "--tls-key"} & flags


def test_bad_token_file_fails_at_start_with_a_message_not_a_traceback(tmp_path):
    done = subprocess.run(
        [*CLI, "serve", "--port", "0", "--token-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "remat serve: error: cannot read token file" in done.stderr
    assert "Traceback" not in done.stderr
