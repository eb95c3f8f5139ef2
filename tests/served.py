"""`remat serve` as a real process for tests: started on a free port, its Prometheus
metrics read back, stopped or killed. Every wait has a timeout."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import HANG_SECONDS

CLI = [sys.executable, "-m", "remat.cli"]
# One BLAS thread per server: the machine is shared, and run times stay predictable.
SERVER_ENV = {
    "PYTHONUNBUFFERED": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
LINUX_PROC = os.path.isdir("/proc/self/fd")


class Served:
    """`remat serve --port 0 ARGS` in a subprocess, up once its "listening" line is out."""

    def __init__(self, *args: str, env: dict | None = None, startup: float = HANG_SECONDS):
        # Its own session: a process group to signal like a terminal's Ctrl-C does.
        self.process = subprocess.Popen(
            [*CLI, "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **SERVER_ENV, **(env or {})},
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(
            target=self._pump, args=(self.process.stdout, self.lines.put), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(self.process.stderr, self.errors.append), daemon=True
        ).start()
        try:
            self.line = self.lines.get(timeout=startup)
        except queue.Empty:
            self.kill()
            pytest.fail(f"no listening line within {startup} s; stderr: {self.stderr}")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.line)
        assert match, (self.line, self.stderr)
        self.port = int(match.group(1))
        metrics = re.search(r"metrics on http://[^ ]+:(\d+)/metrics", self.line)
        self.metrics_port = int(metrics.group(1)) if metrics else None
        pids = re.search(r"pids ([\d, ]+)\)", self.line)
        self.worker_pids = [int(p) for p in pids.group(1).split(",")] if pids else []

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of the /metrics exposition: (name, sorted labels) -> value."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=HANG_SECONDS
        ) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def inflight(self) -> float:
        return self.metrics()[("remat_inflight_requests", ())]

    def wait_until_busy(self, baseline: float, timeout: float = HANG_SECONDS) -> None:
        """Until one more RPC than `baseline` is in flight (and still is 0.3 s later:
        the run, not the quick inline first call before it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight() > baseline:
                time.sleep(0.3)
                if self.inflight() > baseline:
                    return
            time.sleep(0.02)
        pytest.fail(f"no RPC in flight within {timeout} s; stderr: {self.stderr}")

    def terminate(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not exit within {timeout} s; stderr: {self.stderr}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def slow_tanh_graph(name: str, side: int, steps: int):
    """A graph of `steps` tanh over a (side, side) float32 broadcast of its (1, side)
    input "x": seconds of work in steps of a millisecond, so a run can be cancelled,
    timed out or kept busy between two of them."""
    import remat

    g = remat.Graph(name)
    h = remat.broadcast_to(g.input("x", (1, side)), (side, side))
    for _ in range(steps):
        h = remat.tanh(h)
    g.output("s", remat.sum(h))
    return g
