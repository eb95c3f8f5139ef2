"""The `remat` command line, run as a subprocess: demo, ops, serve."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from support import HANG_SECONDS

import remat

CLI = [sys.executable, "-m", "remat.cli"]
# Not a terminal, whatever the environment says: rich would otherwise colour the output.
PIPED = {
    k: v
    for k, v in os.environ.items()
    if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=PIPED)


def table_rows(out: str, first: str) -> list[dict[str, str]]:
    """The rows of the table whose header line starts with `first` (above a rule), each
    {header: cell}; cells are two or more spaces apart, a row may leave its last cells
    empty, blank lines (between sections) are skipped, and the table ends at the first
    line that is not a row (a caption, another table's title)."""
    lines = out.splitlines()
    start = next(
        i
        for i, line in enumerate(lines[:-1])
        if line.split()[:1] == [first] and re.fullmatch("[─-]+", lines[i + 1].strip())
    )  # the rule under it
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if not line.strip():
            continue
        if len(cells) < 2:
            break
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def test_demo_prints_loss_gradient_norms_and_metrics():
    done = run_cli("demo", "--batch", "8")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b" not in out  # piped: no colour codes
    loss = re.search(r"loss = (\S+)", out)
    assert loss and np.isfinite(float(loss.group(1))) and float(loss.group(1)) > 0
    assert "batch 8" in out
    grads = {row["input"]: row for row in table_rows(out, "input")}
    assert {"w0", "b0", "w1", "b1"} <= set(grads), out
    norms = {name: float(row["gradient norm"]) for name, row in grads.items()}
    assert all(np.isfinite(v) for v in norms.values())
    assert norms["w0"] > 0
    assert grads["w0"]["shape"] == "64x64" and grads["b0"]["shape"] == "64"
    peak = re.search(r"^peak bytes\s+([\d,]+)\s+predicted ([\d,]+)", out, re.MULTILINE)
    assert peak and peak.group(1) == peak.group(2), out
    for field in ("forward", "backward", "total"):
        assert re.search(rf"^{field}\s+[\d.]+\s+ms", out, re.MULTILINE), field
    for field in ("nodes computed", "flops"):
        assert (
            int(re.search(rf"^{field}\s+([\d,]+)", out, re.MULTILINE).group(1).replace(",", "")) > 0
        ), field
    # Seeded: the same command prints the same loss.
    assert re.search(r"loss = (\S+)", run_cli("demo", "--batch", "8").stdout).group(
        1
    ) == loss.group(1)


def test_ops_lists_matmul_and_conv2d():
    done = run_cli("ops")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # piped: no colour codes
    ops = {row["op"]: row for row in table_rows(done.stdout, "family")}
    assert "matmul" in ops and "conv2d" in ops
    assert ops["matmul"]["family"] == "linalg"
    assert ops["matmul"]["gradient"] == "differentiable"
    assert ops["gt"]["gradient"] == "no gradient"
    assert ops["matmul"]["inputs"] == "2" and ops["concat"]["inputs"] == "1+"
    assert ops["conv2d"]["attributes"] == "stride?, padding?, dilation?, groups?"
    assert "attr? marks an optional attribute" in done.stdout


def test_ops_against_a_running_server(server_port):
    done = run_cli("ops", "--target", f"127.0.0.1:{server_port}")
    assert done.returncode == 0, done.stderr
    ops = {row["op"]: row for row in table_rows(done.stdout, "family")}
    assert ops["matmul"]["family"] == "linalg"
    assert ops["reshape"]["attributes"] == "shape"


def _read_lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def test_serve_on_port_zero_answers_then_exits_cleanly_on_sigterm():
    # A grace far longer than any wait here: with nothing in flight, the server must not
    # wait for it.
    process = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--grace", str(10 * HANG_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        try:
            first = lines.get(timeout=HANG_SECONDS)
        except queue.Empty:
            pytest.fail(f"the server printed nothing within {HANG_SECONDS} s")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", first)
        assert match, first
        port = int(match.group(1))
        assert port > 0
        # With default flags the server has a memory budget, and says where it came from.
        assert re.search(r"; memory budget [\d.]+ [KMG]iB: 50% of .*\((cgroup|physical)", first)

        g = remat.Graph("cli")
        x = g.input("x", (3,), "float64")
        g.output("loss", remat.sum(x * x))
        with remat.Client(f"127.0.0.1:{port}", timeout=HANG_SECONDS) as client:
            result = client.run(g, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss")
        assert float(result.outputs["loss"]) == 14.0
        np.testing.assert_array_equal(result.grads["x"], [2.0, 4.0, 6.0])

        process.send_signal(signal.SIGTERM)
        # Exits 0 without waiting out its grace (10 x this wait; no tighter wall-clock
        # bound: on a loaded machine that is scheduling luck).
        assert process.wait(timeout=HANG_SECONDS) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_has_a_flag_for_every_limit_and_the_memory_budget():
    """Every Limits and ServerConfig knob is settable from the command line, so the
    error messages that name a flag point at one that exists."""
    from dataclasses import fields

    from remat_server import Limits
    from remat_server.service.flags import build_parser

    serve = build_parser({})
    flags = {option for action in serve._actions for option in action.option_strings}
    wanted = {"--" + f.name.replace("_", "-") for f in fields(Limits)}
    wanted |= {"--memory-budget-bytes", "--max-queued-requests", "--compile-cache-bytes"}
    assert wanted <= flags, sorted(wanted - flags)
    args = build_parser({}).parse_args(
        ["--memory-budget-bytes", "123", "--optimal-time-limit", "2.5"]
    )
    assert args.memory_budget_bytes == 123 and args.optimal_time_limit == 2.5


def test_every_server_config_field_is_reachable_from_a_flag_or_documented_env_var(tmp_path):
    """A ServerConfig field nobody can set from `remat serve` is a deploy-time dead end:
    each one here changes from its default through a flag, or (secrets) through an
    environment variable that `remat serve --help` names."""
    from dataclasses import fields

    from remat_server import ServerConfig
    from remat_server.service.flags import build_parser, server_config

    pem = {}
    for name in ("cert", "key", "ca"):
        pem[name] = tmp_path / f"{name}.pem"
        pem[name].write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    tls = ["--tls-cert-file", str(pem["cert"]), "--tls-key-file", str(pem["key"])]
    by_flag = {
        "host": ["--host", "0.0.0.0"],
        "port": ["--port", "1234"],
        "max_message_bytes": ["--max-message-mb", "7"],
        "stream_chunk_bytes": ["--stream-chunk-bytes", "4096"],
        "max_workers": ["--threads", "3"],
        "max_concurrent_rpcs": ["--max-concurrent-rpcs", "9"],
        "graph_cache_bytes": ["--graph-cache-bytes", "1000"],
        "compile_cache_bytes": ["--compile-cache-bytes", "1000"],
        "memory_budget_bytes": ["--memory-budget-bytes", "123"],
        "memory_budget_fraction": ["--memory-budget-fraction", "0.25"],
        "machine_memory_bytes": ["--machine-memory-bytes", str(4 << 30)],
        "max_concurrent_solves": ["--max-concurrent-solves", "3"],
        "max_upload_seconds": ["--max-upload-seconds", "7.5"],
        "max_queued_requests": ["--max-queued-requests", "5"],
        "buffer_pool_bytes": ["--buffer-pool-bytes", "0"],
        "malloc_mmap_threshold_bytes": ["--malloc-mmap-threshold-bytes", str(32 << 20)],
        "malloc_trim_threshold_bytes": ["--malloc-trim-threshold-bytes", str(64 << 20)],
        "malloc_arena_max": ["--malloc-arena-max", "0"],
        "limits": ["--max-nodes", "17"],
        "reuse_port": ["--reuse-port"],
        "max_connection_age_seconds": ["--max-connection-age-seconds", "300"],
        "max_connection_age_grace_seconds": ["--max-connection-age-grace-seconds", "5"],
        "tls_cert_file": tls,
        "tls_key_file": tls,
        "tls_client_ca_file": [*tls, "--tls-client-ca-file", str(pem["ca"])],
        "auth_tokens": ["--token-file", str(tokens)],
    }
    by_env = {
        "tls_cert_file": {
            "REMAT_TLS_CERT_FILE": str(pem["cert"]),
            "REMAT_TLS_KEY_FILE": str(pem["key"]),
        },
        "tls_client_ca_file": {
            "REMAT_TLS_CERT_FILE": str(pem["cert"]),
            "REMAT_TLS_KEY_FILE": str(pem["key"]),
            "REMAT_TLS_CLIENT_CA_FILE": str(pem["ca"]),
        },
        "auth_tokens": {"REMAT_AUTH_TOKENS": "t0ken"},
    }
    by_env["tls_key_file"] = by_env["tls_cert_file"]
    names = {f.name for f in fields(ServerConfig)}
    assert names == set(by_flag) | set(by_env), sorted(names ^ (set(by_flag) | set(by_env)))
    default = ServerConfig()
    for name, argv in by_flag.items():
        config = server_config(build_parser({}).parse_args(argv), environ={})
        assert getattr(config, name) != getattr(default, name), name
    serve = build_parser({})
    help_text = " ".join(serve.format_help().split())
    for name, environ in by_env.items():
        config = server_config(build_parser({}).parse_args([]), environ=environ)
        assert getattr(config, name) != getattr(default, name), name
        for var in environ:
            assert f"${var}" in help_text, var


# --- `remat serve` flags from the environment ------------------------------------------------
def _serve_parser(environ):
    from remat_server.service.flags import build_parser

    return build_parser(environ)


def test_every_serve_flag_defaults_from_its_env_var_and_a_flag_wins():
    from remat_server.service.auth import TLS_ENV
    from remat_server.service.flags import build_parser, serve_env_vars

    env = serve_env_vars()
    serve = _serve_parser({})
    flags = {a.option_strings[0]: a for a in serve._actions if a.option_strings}
    # Every flag but --help and --token-file (REMAT_TOKEN_FILE is the SDK's own token).
    assert set(env.values()) == set(flags) - {"-h", "--token-file"}
    assert "REMAT_TOKEN_FILE" not in env and "REMAT_AUTH_TOKENS" not in env
    assert {var: env[var] for var in TLS_ENV.values()} == {
        "REMAT_TLS_CERT_FILE": "--tls-cert-file",
        "REMAT_TLS_KEY_FILE": "--tls-key-file",
        "REMAT_TLS_CLIENT_CA_FILE": "--tls-client-ca-file",
    }
    cases = [  # (variable, text, attribute, value)
        ("REMAT_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("REMAT_PORT", "6000", "port", 6000),
        ("REMAT_THREADS", "3", "threads", 3),
        ("REMAT_METRICS_PORT", "9464", "metrics_port", 9464),
        ("REMAT_GRACE", "2.5", "grace", 2.5),
        ("REMAT_MAX_NODES", " 17 ", "max_nodes", 17),
        ("REMAT_OPTIMAL_TIME_LIMIT", "7.5", "optimal_time_limit", 7.5),
        ("REMAT_MEMORY_BUDGET_BYTES", "1073741824", "memory_budget_bytes", 1 << 30),
        ("REMAT_MAX_CONNECTION_AGE_SECONDS", "300", "max_connection_age_seconds", 300.0),
        ("REMAT_MAX_CONNECTION_AGE_GRACE_SECONDS", "0", "max_connection_age_grace_seconds", 0.0),
        ("REMAT_MAX_NODES", "", "max_nodes", 100_000),  # empty: unset
    ] + [
        ("REMAT_REUSE_PORT", text, "reuse_port", on)
        for on, words in ((True, ("1", "true", "Yes")), (False, ("0", "false", "NO")))
        for text in words
    ]
    for var, text, attribute, expected in cases:
        args = build_parser({var: text}).parse_args([])
        assert getattr(args, attribute) == expected, (var, text)
        assert type(getattr(args, attribute)) is type(expected), (var, text)
    args = build_parser({"REMAT_MAX_NODES": "17", "REMAT_THREADS": "not a number"}).parse_args(
        ["--max-nodes", "5", "--threads", "2"]
    )
    assert (args.max_nodes, args.threads) == (5, 2)  # flags win; the bad value is unused
    # Other commands never read the serve variables, good or bad.
    from remat.cli import build_parser as sdk_parser

    assert sdk_parser().parse_args(["ops"]).command == "ops"
    # The token file variable stays the client's.
    assert build_parser({"REMAT_TOKEN_FILE": "/x"}).parse_args([]).token_file == ""


def test_a_bad_env_var_is_a_usage_error_naming_it(capsys):
    from remat_server.service.flags import build_parser

    for var, text, flag in [
        ("REMAT_MAX_NODES", "lots", "--max-nodes"),
        ("REMAT_WORKERS", "0", "--workers"),
        ("REMAT_REUSE_PORT", "maybe", "--reuse-port"),
        ("REMAT_MAX_CONNECTION_AGE_SECONDS", "-1", "--max-connection-age-seconds"),
        # glibc refuses an mmap threshold of 0 or over 32 MiB: refused before serving.
        ("REMAT_MALLOC_MMAP_THRESHOLD_BYTES", "0", "--malloc-mmap-threshold-bytes"),
        ("REMAT_MALLOC_MMAP_THRESHOLD_BYTES", str(64 << 20), "--malloc-mmap-threshold-bytes"),
        ("REMAT_MALLOC_TRIM_THRESHOLD_BYTES", "-1", "--malloc-trim-threshold-bytes"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            build_parser({var: text}).parse_args([])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid value ${var}={text!r} in the environment" in err, err


def test_serve_help_states_the_env_var_rule():
    help_text = " ".join(_serve_parser({}).format_help().split())
    assert "REMAT_ and the flag's name in capitals with - as _" in help_text
    assert "$REMAT_MAX_NODES for --max-nodes" in help_text
    assert "a flag on the command line wins" in help_text


def test_serve_reads_os_environ_end_to_end():
    """`remat serve` as a process, configured only through the environment."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "REMAT_PORT": "0",
        "REMAT_GRACE": "1",
        "REMAT_METRICS_PORT": "0",
        "REMAT_MAX_NODES": "3",
    }
    process = subprocess.Popen(
        [*CLI, "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=HANG_SECONDS)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+); metrics on http://\S+:(\d+)/", first)
        assert match, first
        g = remat.Graph("big")
        x = g.input("x", (2,), "float64")
        g.output("y", remat.sum(remat.exp(x) * x + x))
        target = f"127.0.0.1:{match.group(1)}"
        with remat.Client(target, timeout=HANG_SECONDS) as client:
            with pytest.raises(remat.InvalidArgumentError, match="--max-nodes"):
                client.plan(g, wrt=["x"], loss="y")
            health = run_cli("health", "--target", target, "--timeout", str(HANG_SECONDS))
            assert health.returncode == 0, health.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_SECONDS) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- remat health ----------------------------------------------------------------------------
def test_health_exit_codes(capsys):
    from remat.cli import main
    from remat_server import ServerConfig, create_server

    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        assert main(["health", "--target", target]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        assert main(["health", "--target", target, "--service", "remat.v1.Executor"]) == 0
        capsys.readouterr()
        assert main(["health", "--target", target, "--service", "no.such.Service"]) == 1
        assert (
            "NOT_FOUND: no health status for service 'no.such.Service'" in capsys.readouterr().err
        )
        server.health.enter_graceful_shutdown()  # what SIGTERM does first
        assert main(["health", "--target", target]) == 1
        assert capsys.readouterr().err.strip() == f"remat health: {target}: NOT_SERVING"
    finally:
        server.stop(None).wait()
    # Nothing listens: the check fails at once with UNAVAILABLE (connection refused), not
    # DEADLINE_EXCEEDED at the end of its --timeout, which is why that can be long.
    assert main(["health", "--target", target, "--timeout", str(HANG_SECONDS)]) == 1
    assert f"remat health: {target}: UNAVAILABLE" in capsys.readouterr().err
    assert main(["health", "--target", target, "--tls-ca-file", "/nonexistent/ca.pem"]) == 1
    assert "cannot read TLS root file" in capsys.readouterr().err


def test_health_command_against_a_server_process(server_port):
    done = run_cli("health", "--target", f"127.0.0.1:{server_port}", "--timeout", str(HANG_SECONDS))
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "SERVING", "")


# --- connection age ----------------------------------------------------------------------------
def test_server_options_set_the_connection_age_only_when_asked():
    from remat_server import ServerConfig
    from remat_server.service.app import server_options

    cases = [  # (age, grace) -> the options set
        ((0.0, 30.0), {}),
        (
            (300.0, 30.0),
            {"grpc.max_connection_age_ms": 300_000, "grpc.max_connection_age_grace_ms": 30_000},
        ),
        ((1.5, 0.0), {"grpc.max_connection_age_ms": 1500}),
        (
            (1e12, 1e12),
            {
                "grpc.max_connection_age_ms": 2**31 - 1,
                "grpc.max_connection_age_grace_ms": 2**31 - 1,
            },
        ),
    ]
    for (age, grace), expected in cases:
        options = dict(
            server_options(
                ServerConfig(max_connection_age_seconds=age, max_connection_age_grace_seconds=grace)
            )
        )
        assert {k: v for k, v in options.items() if "connection_age" in k} == expected


def test_calls_keep_working_across_the_connection_age_boundary():
    """The server closes connections every ~0.5 s; SDK calls and health checks made over
    at least ~1.5 s all succeed, and the channel did reconnect meanwhile."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from remat_server import ServerConfig, create_server

    server, port = create_server(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            max_connection_age_seconds=0.5,
            max_connection_age_grace_seconds=1.0,
        )
    )
    server.start()
    g = remat.Graph("age")
    x = g.input("x", (3,), "float64")
    g.output("loss", remat.sum(x * x))
    states: list = []
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    channel.subscribe(states.append)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        calls = 0
        with remat.Client(f"127.0.0.1:{port}", timeout=HANG_SECONDS) as client:
            start = time.monotonic()
            # For 1.5 s, and on until 11 calls and a reconnection, however slow the machine.
            while (
                time.monotonic() - start < 1.5
                or calls <= 10
                or states.count(grpc.ChannelConnectivity.READY) < 2
            ):
                assert time.monotonic() - start < HANG_SECONDS, (calls, states)
                result = client.run(g, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss")
                assert float(result.outputs["loss"]) == 14.0
                assert (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=HANG_SECONDS).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
                calls += 1
                time.sleep(0.01)
    finally:
        channel.unsubscribe(states.append)
        channel.close()
        server.stop(None).wait()
    assert calls > 10
    # READY, then GOAWAY (back to IDLE), then READY again on the next call.
    assert states.count(grpc.ChannelConnectivity.READY) >= 2, states
