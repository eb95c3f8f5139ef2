"""Load test: K concurrent clients for T seconds against one remat server process.

    python bench/load.py [--quick] [--clients 32] [--seconds 60] [--warmup 10] [--checks 3]

Each client is a thread with its own connection, in worker processes of up to 8 threads
(so the clients are not all behind one GIL). Each loops, drawing with a seeded RNG
among valid requests (a small MLP's gradients, checked against the engine run
in-process; a Plan; a 4 MiB tensor round trip through RunStream, checked exactly),
invalid ones (INVALID_ARGUMENT expected) and slower requests that are cut short (a
client deadline: DEADLINE_EXCEEDED; or `future.cancel()` on the raw stub: CANCELLED;
either may also finish first). Every outcome is expected or unexpected.

The server's RSS (/proc/<pid>/status VmRSS) is sampled throughout. The clients run
--warmup seconds and pause: the idle RSS then is the baseline. They run --seconds more,
pausing --checks times (the last at the end) for an idle reading: the last is the
final. Growth = final / baseline - 1. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from transfer import REMAT_SERVER, read_ports, started  # bench/ is on sys.path as a script

MiB = 1 << 20
THREADS_PER_PROCESS = 8
GROWTH_GOAL = 0.05
# kind -> (weight, statuses that are expected outcomes)
KINDS = {
    "run_small": (0.35, {"OK"}),
    "plan": (0.15, {"OK"}),
    "run_stream": (0.15, {"OK"}),
    "invalid": (0.20, {"INVALID_ARGUMENT"}),
    "deadline": (0.075, {"DEADLINE_EXCEEDED", "OK"}),
    "cancel": (0.075, {"CANCELLED", "OK"}),
}
SMALL = dict(batch=16, widths=(32, 64, 64, 10))
SLOW = dict(batch=128, widths=(256, 512, 512, 10))  # ~0.15-0.2 s of compute here, 1.7 MiB
STREAM_SHAPE = (1024, 1024)  # float32: 4 MiB up, 8 MiB down (output and gradient)
MAX_DETAILS = 20  # unexpected outcomes described per worker


# --- the client side (worker processes) -----------------------------------------------------
class Workload:
    """The graphs, inputs and reference answers every client thread of a process shares."""

    def __init__(self, target: str):
        import remat
        from remat_server.engine import Engine, RunRequest
        from remat_server.graph.limits import Limits
        from remat_server.service.codec import graph_from_proto

        self.target = target
        self.small = remat.models.mlp(**SMALL)
        self.slow = remat.models.mlp(**SLOW)
        # The reference: the same engine in this process, no gRPC.
        spec = graph_from_proto(self.small.graph.to_proto(), Limits())
        reference = Engine().run(
            RunRequest(spec, self.small.inputs, wrt=tuple(self.small.wrt), loss=self.small.loss)
        )
        self.small_expected = {
            **reference.outputs,
            **{f"grad/{k}": v for k, v in reference.grads.items()},
        }
        with remat.Client(target) as client:
            self.plan_peak = client.plan(
                self.small.graph, wrt=self.small.wrt, loss=self.small.loss, policy="sqrt"
            ).peak_bytes

        g = remat.Graph("stream")
        x = g.input("x", STREAM_SHAPE, "float32")
        g.output("y", x * 2.0)
        g.output("loss", remat.sum(x * x))
        self.stream_graph = g
        self.stream_x = np.random.default_rng(0).standard_normal(STREAM_SHAPE, dtype=np.float32)
        self.stream_loss = float(np.sum(self.stream_x.astype(np.float64) ** 2))

        bad = remat.Graph("unknown_op")
        bad.output("y", remat.op("no_such_op", bad.input("x", (4,), "float32")))
        huge = remat.Graph("over_limit")
        huge.output("y", remat.sum(huge.input("x", (1 << 20, 1 << 20), "float32")))
        tiny = remat.Graph("tiny")
        tiny.output("y", remat.tanh(tiny.input("x", (4,), "float32")))
        ones = np.ones(4, np.float32)
        self.invalid = [
            lambda c: c.run(bad, {"x": ones}),  # unknown op
            lambda c: c.run(tiny, {"nope": ones}),  # wrong input name
            lambda c: c.run(tiny, {"x": np.ones(5, np.float32)}),  # wrong shape
            lambda c: c.plan(huge),  # shape over the limit
        ]


def _check_small(work: Workload, result) -> str | None:
    got = {**result.outputs, **{f"grad/{k}": v for k, v in result.grads.items()}}
    for name, expected in work.small_expected.items():
        if name not in got or not np.allclose(got[name], expected, rtol=1e-5, atol=1e-6):
            return f"run_small: '{name}' differs from the in-process engine's"
    return None


def _check_stream(work: Workload, result) -> str | None:
    x = work.stream_x
    if not np.array_equal(result.outputs["y"], x * 2.0):
        return "run_stream: y != 2x"
    if not np.array_equal(result.grads["x"], x + x):
        return "run_stream: grad != 2x"
    if not math.isclose(float(result.outputs["loss"]), work.stream_loss, rel_tol=1e-4):
        return f"run_stream: loss {float(result.outputs['loss'])} != {work.stream_loss}"
    return None


def _cancelled_call(work: Workload, stub, rng: random.Random) -> str:
    """A Run through the raw stub's future, cancelled after a random delay."""
    import grpc

    from remat import calls
    from remat_proto.v1 import executor_pb2

    request, _ = calls.run_request(
        executor_pb2.GraphRef(graph=work.slow.graph.to_proto()),
        work.slow.graph,
        work.slow.inputs,
        wrt=work.slow.wrt,
        loss=work.slow.loss,
        stream=False,
    )
    future = stub.Run.future(request)
    time.sleep(rng.uniform(0.0, 0.3))
    future.cancel()
    try:
        future.result()
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def _one(kind: str, work: Workload, client, stub, rng: random.Random) -> tuple[str, str | None]:
    """Do one request of `kind`; (status, what was wrong with an OK answer or None)."""
    import remat

    try:
        if kind == "run_small":
            m = work.small
            return "OK", _check_small(work, client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss))
        if kind == "plan":
            m = work.small
            peak = client.plan(m.graph, wrt=m.wrt, loss=m.loss, policy="sqrt").peak_bytes
            wrong = None if peak == work.plan_peak else f"plan: peak {peak} != {work.plan_peak}"
            return "OK", wrong
        if kind == "run_stream":
            result = client.run(work.stream_graph, {"x": work.stream_x}, wrt=["x"], loss="loss")
            return "OK", _check_stream(work, result)
        if kind == "invalid":
            rng.choice(work.invalid)(client)
            return "OK", None
        if kind == "deadline":
            m = work.slow
            client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss, timeout=rng.uniform(0.01, 0.4))
            return "OK", None
        if kind == "cancel":
            return _cancelled_call(work, stub, rng), None
    except remat.RematError as error:
        return error.code, None if error.code in KINDS[kind][1] else f"{kind}: {error}"
    raise ValueError(f"unknown kind {kind}")


def _client_loop(work: Workload, seed: str, seconds: float, out: list) -> None:
    import grpc

    import remat
    from remat_proto.v1 import executor_pb2_grpc

    rng = random.Random(seed)
    kinds, weights = list(KINDS), [weight for weight, _ in KINDS.values()]
    records, details = [], []
    with (
        remat.Client(work.target, retry=remat.calls.NO_RETRY) as client,
        grpc.insecure_channel(work.target) as channel,
    ):
        stub = executor_pb2_grpc.ExecutorStub(channel)
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            kind = rng.choices(kinds, weights)[0]
            began = time.perf_counter()
            try:
                status, wrong = _one(kind, work, client, stub, rng)
            except Exception as error:  # noqa: BLE001 - a client-side failure is an outcome too
                status, wrong = f"CLIENT_{type(error).__name__}", f"{kind}: {error!r}"
            if wrong is None and status not in KINDS[kind][1]:
                wrong = f"{kind}: {status}, expected {'/'.join(sorted(KINDS[kind][1]))}"
            records.append((kind, status, time.perf_counter() - began, wrong is None))
            if wrong is not None and len(details) < MAX_DETAILS:
                details.append(wrong[:300])
        elapsed = time.perf_counter() - start
    out.append((records, details, elapsed))


def worker_main(config: str) -> None:
    """A worker process: import, read the server's address from stdin, set up, print
    "ready"; then for each "run <seconds>" line on stdin run its client threads that
    long and print their records as one JSON line."""
    import remat  # noqa: F401 - import while the server starts
    import remat_server.engine  # noqa: F401

    config = json.loads(config)
    work = Workload(sys.stdin.readline().strip())
    print("ready", flush=True)
    for phase, line in enumerate(sys.stdin):
        seconds = float(line.split()[1])
        out: list = []
        threads = [
            threading.Thread(
                target=_client_loop,
                args=(work, f"{config['seed']}-{config['index']}-{i}-{phase}", seconds, out),
            )
            for i in range(config["threads"])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(
            json.dumps(
                {
                    "records": [r for records, _, _ in out for r in records],
                    "details": [d for _, details, _ in out for d in details],
                    "elapsed": max((e for *_, e in out), default=0.0),
                }
            ),
            flush=True,
        )


_WORKER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    "from load import worker_main; worker_main(sys.argv[1])"
)


# --- the server's memory ------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


class RssSampler:
    """VmRSS of `pid` every `interval` seconds, tagged with the current phase."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.phase = pid, interval, "start"
        self.samples: list[tuple[str, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((self.phase, time.monotonic(), rss_bytes(self.pid)))

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def idle(self, settle: float = 1.0, count: int = 5) -> int:
        """The median RSS over a quiet moment (no client running)."""
        time.sleep(settle)
        values = []
        for _ in range(count):
            values.append(rss_bytes(self.pid))
            time.sleep(0.02)
        return int(statistics.median(values))

    def of(self, phase: str) -> list[int]:
        return [rss for p, _, rss in self.samples if p == phase]


# --- driving the workers ----------------------------------------------------------------------
class Workers:
    """The client processes: `clients` threads over ceil(clients / 8) processes."""

    def __init__(self, clients: int, seed: int):
        processes = max(1, math.ceil(clients / THREADS_PER_PROCESS))
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, json.dumps(dict(seed=seed, index=i, threads=n))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, n in enumerate(shares)
        ]

    def connect(self, target: str) -> None:
        """Give the workers the server's address; wait until they are set up."""
        for proc in self.procs:
            proc.stdin.write(target + "\n")
            proc.stdin.flush()
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError("a client process failed to start")

    def run(self, seconds: float) -> dict:
        for proc in self.procs:
            proc.stdin.write(f"run {seconds}\n")
            proc.stdin.flush()
        outs = []
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a client process died ({proc.wait()})")
            outs.append(json.loads(line))
        return {
            "records": [r for o in outs for r in o["records"]],
            "details": [d for o in outs for d in o["details"]],
            "elapsed": max(o["elapsed"] for o in outs),
        }

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the report ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(phase: dict) -> dict:
    records = phase["records"]
    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, latency, expected in records:
        by_kind[kind].append((status, latency, expected))
    kinds = {}
    for kind in KINDS:
        rows = by_kind.get(kind, [])
        latencies = [latency for _, latency, _ in rows]
        kinds[kind] = dict(
            requests=len(rows),
            statuses=dict(Counter(status for status, _, _ in rows)),
            unexpected=sum(not ok for *_, ok in rows),
            p50_ms=percentile(latencies, 0.5) * 1e3 if rows else None,
            p99_ms=percentile(latencies, 0.99) * 1e3 if rows else None,
        )
    return dict(
        requests=len(records),
        seconds=phase["elapsed"],
        throughput=len(records) / phase["elapsed"] if phase["elapsed"] else 0.0,
        statuses=dict(Counter(status for _, status, _, _ in records)),
        unexpected=sum(not ok for *_, ok in records),
        kinds=kinds,
        details=phase["details"],
    )


def table(summary: dict) -> str:
    lines = [
        "| kind | requests | p50 ms | p99 ms | statuses | unexpected |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for kind, k in summary["kinds"].items():
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(k["statuses"].items()))
        p50 = "—" if k["p50_ms"] is None else f"{k['p50_ms']:.1f}"
        p99 = "—" if k["p99_ms"] is None else f"{k['p99_ms']:.1f}"
        lines.append(
            f"| {kind} | {k['requests']} | {p50} | {p99} | {statuses} | {k['unexpected']} |"
        )
    statuses = ", ".join(f"{s} {n}" for s, n in sorted(summary["statuses"].items()))
    lines.append(f"| **all** | {summary['requests']} | | | {statuses} | {summary['unexpected']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 clients, 5 s after a 3 s warm-up (smoke test)"
    )
    parser.add_argument("--clients", type=int, help="concurrent clients (default 32; quick 4)")
    parser.add_argument("--seconds", type=float, help="measured seconds (default 60; quick 5)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of load before the RSS baseline (default 10; quick 3)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds every client thread's choice of requests (default 0)",
    )
    parser.add_argument(
        "--checks",
        type=int,
        default=3,
        help="pause this many times during the measured seconds (the last at "
        "the end) to read the idle RSS (default 3)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="quiet seconds before each idle RSS reading (default 1)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the server's environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.checks < 1:
        parser.error("--checks must be at least 1")
    clients = args.clients or (4 if args.quick else 32)
    seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    env = dict(item.split("=", 1) for item in args.server_env)

    processes = math.ceil(clients / THREADS_PER_PROCESS)
    print(
        f"# load: {clients} clients ({processes} processes) for {seconds:g} s after a "
        f"{warmup:g} s warm-up, seed {args.seed}\n"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs "
        f"(clients and server share them; load average {os.getloadavg()[0]:.1f} at start); "
        f"server: default ServerConfig (8 workers)"
        + (f", {' '.join(f'{k}={v}' for k, v in env.items())}" if env else "")
        + "\n"
    )
    with started(REMAT_SERVER, env) as server:
        workers = Workers(clients, args.seed)  # they import while the server starts
        rss = RssSampler(server.pid)
        try:
            (port,) = read_ports(server)
            workers.connect(f"127.0.0.1:{port}")
            rss.start()
            rss_start = rss.idle(settle=0.0)
            rss.phase = "warmup"
            warm = summarize(workers.run(warmup))
            rss.phase = "idle"
            baseline = rss.idle(args.settle)
            idle, parts = [baseline], []
            for _ in range(args.checks):  # idle readings along the way: a leak's trend
                rss.phase = "measure"
                parts.append(workers.run(seconds / args.checks))
                rss.phase = "idle"
                idle.append(rss.idle(args.settle))
            final = idle[-1]
        finally:
            workers.close()
            rss.stop()
    measured = summarize(
        {
            "records": [r for part in parts for r in part["records"]],
            "details": [d for part in parts for d in part["details"]],
            "elapsed": sum(part["elapsed"] for part in parts),
        }
    )
    loaded = rss.of("measure") or [final]
    window = max(1, len(loaded) // 10)
    memory = dict(
        start=rss_start,
        baseline=baseline,
        final=final,
        idle=idle,
        peak=max(loaded),
        growth=final / baseline - 1,
        peak_growth=max(loaded) / baseline - 1,
        loaded_first=int(statistics.median(loaded[:window])),
        loaded_last=int(statistics.median(loaded[-window:])),
    )
    memory["loaded_growth"] = memory["loaded_last"] / memory["loaded_first"] - 1
    unexpected = warm["unexpected"] + measured["unexpected"]
    ok = unexpected == 0 and memory["growth"] < GROWTH_GOAL

    print(table(measured))
    print(
        f"\n{measured['requests']} requests in {measured['seconds']:.1f} s: "
        f"{measured['throughput']:.1f} req/s (warm-up: {warm['requests']} requests, "
        f"{warm['unexpected']} unexpected)\n"
    )
    marks = "/".join(f"{seconds * (i + 1) / args.checks:.3g}" for i in range(args.checks))
    print(
        f"server RSS, idle (no request in flight): {rss_start / MiB:.1f} MiB at start, "
        f"{baseline / MiB:.1f} MiB after the warm-up (baseline), after {marks} s: "
        + " / ".join(f"{value / MiB:.1f}" for value in idle[1:])
        + f" MiB: growth {100 * memory['growth']:+.1f}%. Under load: peak "
        f"{memory['peak'] / MiB:.1f} MiB ({100 * memory['peak_growth']:+.1f}% of baseline); "
        f"median of the first / last 10% of samples {memory['loaded_first'] / MiB:.1f} / "
        f"{memory['loaded_last'] / MiB:.1f} MiB ({100 * memory['loaded_growth']:+.1f}%)\n"
    )
    for detail in (warm["details"] + measured["details"])[:10]:
        print(f"- unexpected: {detail}")
    print(
        f"{'PASS' if ok else 'FAIL'}: {unexpected} unexpected outcomes (goal 0); RSS growth "
        f"{100 * memory['growth']:+.1f}% (goal < {100 * GROWTH_GOAL:.0f}%)"
    )
    return dict(
        clients=clients,
        seconds=seconds,
        warmup=warmup,
        seed=args.seed,
        warmup_summary=warm,
        summary=measured,
        memory=memory,
        unexpected=unexpected,
        passed=ok,
        env=env,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
