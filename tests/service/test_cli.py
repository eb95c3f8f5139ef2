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

import remat

CLI = [sys.executable, "-m", "remat.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_prints_loss_gradient_norms_and_metrics():
    done = run_cli("demo", "--batch", "8")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    loss = re.search(r"loss = (\S+)", out)
    assert loss and np.isfinite(float(loss.group(1))) and float(loss.group(1)) > 0
    assert "batch 8" in out
    norms = dict(re.findall(r"^\s+(w\d|b\d)\s+([0-9.]+)$", out, re.MULTILINE))
    assert {"w0", "b0", "w1", "b1"} <= set(norms), out
    assert all(np.isfinite(float(v)) for v in norms.values())
    assert float(norms["w0"]) > 0
    peak = re.search(r"peak bytes\s+([\d,]+)\s+\(predicted ([\d,]+)\)", out)
    assert peak and peak.group(1) == peak.group(2), out
    for field in ("forward", "backward", "total", "nodes computed", "flops"):
        assert field in out, field
    # Seeded: the same command prints the same loss.
    assert re.search(r"loss = (\S+)", run_cli("demo", "--batch", "8").stdout).group(1) == loss.group(1)


def test_ops_lists_matmul_and_conv2d():
    done = run_cli("ops")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert "matmul" in lines and "conv2d" in lines
    assert "differentiable" in lines["matmul"]
    assert "no gradient" in lines["gt"]
    assert "linalg:" in done.stdout


def test_ops_against_a_running_server(server_port):
    done = run_cli("ops", "--target", f"127.0.0.1:{server_port}")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+matmul\s", done.stdout, re.MULTILINE)
    assert re.search(r"^\s+reshape\s.*shape$", done.stdout, re.MULTILINE)


def _read_lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def test_serve_on_port_zero_answers_then_exits_cleanly_on_sigterm():
    process = subprocess.Popen([*CLI, "serve", "--port", "0", "--grace", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        try:
            first = lines.get(timeout=30)
        except queue.Empty:
            pytest.fail("the server printed nothing within 30 s")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", first)
        assert match, first
        port = int(match.group(1))
        assert port > 0

        g = remat.Graph("cli")
        x = g.input("x", (3,), "float64")
        g.output("loss", remat.sum(x * x))
        with remat.Client(f"127.0.0.1:{port}", timeout=10) as client:
            result = client.run(g, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss")
        assert float(result.outputs["loss"]) == 14.0
        np.testing.assert_array_equal(result.grads["x"], [2.0, 4.0, 6.0])

        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0, process.stderr.read()
        assert time.monotonic() - start < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_has_a_flag_for_every_limit_and_the_memory_budget():
    """Every Limits and ServerConfig knob is settable from the command line, so the
    error messages that name a flag point at one that exists."""
    from dataclasses import fields

    from remat.cli import build_parser
    from remat_server import Limits

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    wanted = {"--" + f.name.replace("_", "-") for f in fields(Limits)}
    wanted |= {"--memory-budget-bytes", "--max-queued-requests"}
    assert wanted <= flags, sorted(wanted - flags)
    args = build_parser().parse_args(["serve", "--memory-budget-bytes", "123",
                                      "--optimal-time-limit", "2.5"])
    assert args.memory_budget_bytes == 123 and args.optimal_time_limit == 2.5


def test_every_server_config_field_is_reachable_from_a_flag_or_documented_env_var(tmp_path):
    """A ServerConfig field nobody can set from `remat serve` is a deploy-time dead end:
    each one here changes from its default through a flag, or (secrets) through an
    environment variable that `remat serve --help` names."""
    from dataclasses import fields

    from remat.cli import build_parser, server_config
    from remat_server import ServerConfig

    pem = {}
    for name in ("cert", "key", "ca"):
        pem[name] = tmp_path / f"{name}.pem"
        pem[name].write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    tls = ["--tls-cert-file", str(pem["cert"]), "--tls-key-file", str(pem["key"])]
    by_flag = {
        "host": ["--host", "0.0.0.0"], "port": ["--port", "1234"],
        "max_message_bytes": ["--max-message-mb", "7"],
        "stream_chunk_bytes": ["--stream-chunk-bytes", "4096"],
        "max_workers": ["--threads", "3"], "max_concurrent_rpcs": ["--max-concurrent-rpcs", "9"],
        "graph_cache_bytes": ["--graph-cache-bytes", "1000"],
        "memory_budget_bytes": ["--memory-budget-bytes", "123"],
        "max_upload_seconds": ["--max-upload-seconds", "7.5"],
        "max_queued_requests": ["--max-queued-requests", "5"],
        "limits": ["--max-nodes", "17"], "reuse_port": ["--reuse-port"],
        "tls_cert_file": tls, "tls_key_file": tls,
        "tls_client_ca_file": [*tls, "--tls-client-ca-file", str(pem["ca"])],
        "auth_tokens": ["--token-file", str(tokens)],
    }
    by_env = {
        "tls_cert_file": {"REMAT_TLS_CERT_FILE": str(pem["cert"]),
                          "REMAT_TLS_KEY_FILE": str(pem["key"])},
        "tls_client_ca_file": {"REMAT_TLS_CERT_FILE": str(pem["cert"]),
                               "REMAT_TLS_KEY_FILE": str(pem["key"]),
                               "REMAT_TLS_CLIENT_CA_FILE": str(pem["ca"])},
        "auth_tokens": {"REMAT_AUTH_TOKENS": "t0ken"},
    }
    by_env["tls_key_file"] = by_env["tls_cert_file"]
    names = {f.name for f in fields(ServerConfig)}
    assert names == set(by_flag) | set(by_env), sorted(names ^ (set(by_flag) | set(by_env)))
    default = ServerConfig()
    for name, argv in by_flag.items():
        config = server_config(build_parser().parse_args(["serve", *argv]), environ={})
        assert getattr(config, name) != getattr(default, name), name
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    help_text = " ".join(serve.format_help().split())
    for name, environ in by_env.items():
        config = server_config(build_parser().parse_args(["serve"]), environ=environ)
        assert getattr(config, name) != getattr(default, name), name
        for var in environ:
            assert f"${var}" in help_text, var
