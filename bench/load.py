"""Load test: K concurrent clients for T seconds against one remat server process.

    python bench/load.py [--quick] [--clients 32] [--seconds 60] [--warmup 10] [--checks 3]
                         [--solves W | --compare-solves] [--server-flag=--FLAG=VALUE ...]

Each client is a thread with its own connection, in worker processes of up to 8 threads
(so the clients are not all behind one GIL). Each loops, drawing with a seeded RNG
among valid requests (a small MLP's gradients, checked against the engine run
in-process; a Plan; a 4 MiB tensor round trip through RunStream, checked exactly),
invalid ones (INVALID_ARGUMENT expected) and slower requests that are cut short (a
client deadline: DEADLINE_EXCEEDED; or `future.cancel()` on the raw stub: CANCELLED;
either may also finish first). Every outcome is expected or unexpected. `--solves W`
adds exact solves and Budget searches at weight W (the others' weights sum to 1; see
_load_solves.py); `--compare-solves` measures the mix without and with them, in
alternating parts, against one server.

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
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import _load_solves as solves  # bench/ is on sys.path as a script
import numpy as np
from _procmem import rss_by_mapping, rss_bytes, status_field
from transfer import REMAT_SERVER, read_ports, started

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
SOLVE = "solve"  # the kind `--solves` adds (its weight is the option's)
EXPECTED = {**{kind: statuses for kind, (_, statuses) in KINDS.items()}, SOLVE: solves.EXPECTED}
COMPARE_WEIGHT = 0.05  # --compare-solves without --solves


# --- the client side (worker processes) -----------------------------------------------------
class Workload:
    """The graphs, inputs and reference answers every client thread of a process shares."""

    def __init__(self, target: str, with_solves: bool = False):
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
        self.solve = solves.SolveWorkload() if with_solves else None


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
    return solves.cancelled_after(stub.Run.future(request), rng.uniform(0.0, 0.3))


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
        return error.code, None if error.code in EXPECTED[kind] else f"{kind}: {error}"
    raise ValueError(f"unknown kind {kind}")


def _client_loop(work: Workload, seed: str, seconds: float, out: list, solve: float) -> None:
    import grpc

    import remat
    from remat_proto.v1 import executor_pb2_grpc

    rng = random.Random(seed)
    kinds, weights = list(KINDS), [weight for weight, _ in KINDS.values()]
    if solve > 0:
        kinds, weights = [*kinds, SOLVE], [*weights, solve]
    records, details, finished = [], [], Counter()  # finished: within `seconds`, per kind
    with (
        remat.Client(work.target, retry=remat.retries.NO_RETRY) as client,
        grpc.insecure_channel(work.target) as channel,
    ):
        stub = executor_pb2_grpc.ExecutorStub(channel)
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            kind = rng.choices(kinds, weights)[0]
            began, cached = time.perf_counter(), None
            try:
                if kind == SOLVE:
                    status, wrong, cached = solves.one(work.solve, client, stub, rng)
                else:
                    status, wrong = _one(kind, work, client, stub, rng)
            except Exception as error:  # noqa: BLE001 - a client-side failure is an outcome too
                status, wrong = f"CLIENT_{type(error).__name__}", f"{kind}: {error!r}"
            if wrong is None and status not in EXPECTED[kind]:
                wrong = f"{kind}: {status}, expected {'/'.join(sorted(EXPECTED[kind]))}"
            done = time.perf_counter()
            finished[kind] += done <= end
            record = (kind, status, done - began, wrong is None)
            records.append(record if kind != SOLVE else (*record, bool(cached)))
            if wrong is not None and len(details) < MAX_DETAILS:
                details.append(wrong[:300])
        elapsed = time.perf_counter() - start
    out.append((records, details, elapsed, finished))


def worker_main(config: str) -> None:
    """A worker process: import, read the server's address from stdin, set up, print
    "ready"; then for each "run <seconds> [<solve weight>]" line on stdin run its client
    threads that long and print their records as one JSON line."""
    import remat  # noqa: F401 - import while the server starts
    import remat_server.engine  # noqa: F401

    config = json.loads(config)
    work = Workload(sys.stdin.readline().strip(), config.get("solves", False))
    print("ready", flush=True)
    for phase, line in enumerate(sys.stdin):
        _, seconds, *solve = line.split()
        seconds, solve = float(seconds), float(solve[0]) if solve else 0.0
        out: list = []
        threads = [
            threading.Thread(
                target=_client_loop,
                args=(work, f"{config['seed']}-{config['index']}-{i}-{phase}", seconds, out, solve),
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
                    "records": [r for records, *_ in out for r in records],
                    "details": [d for _, details, *_ in out for d in details],
                    "elapsed": max((e for _, _, e, _ in out), default=0.0),
                    "finished": sum((f for *_, f in out), Counter()),
                }
            ),
            flush=True,
        )


_WORKER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    "from load import worker_main; worker_main(sys.argv[1])"
)


# --- the server's memory ------------------------------------------------------------------------
class RssSampler:
    """VmRSS of `pid` every `interval` seconds, tagged with the current phase."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.phase = pid, interval, "start"
        self.samples: list[tuple[str, float, int]] = []
        self.threads: list[int] = []  # the server's threads at each idle reading
        self.mappings: list[dict[str, int]] = []  # and its RSS by kind of mapping
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
        self.threads.append(status_field("Threads", self.pid))
        self.mappings.append(rss_by_mapping(self.pid))
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

    def __init__(self, clients: int, seed: int, with_solves: bool = False):
        processes = max(1, math.ceil(clients / THREADS_PER_PROCESS))
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        config = dict(solves=True) if with_solves else {}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    json.dumps(dict(seed=seed, index=i, threads=n, **config)),
                ],
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

    def run(self, seconds: float, solve: float = 0.0) -> dict:
        for proc in self.procs:
            proc.stdin.write(f"run {seconds} {solve}\n" if solve > 0 else f"run {seconds}\n")
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
            "finished": sum((Counter(o["finished"]) for o in outs), Counter()),
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


def summarize(phase: dict, with_solves: bool = False) -> dict:
    """Per kind (KINDS, and `solve` too `with_solves`): requests, statuses, unexpected
    outcomes, p50/p99 latency; a solve's also how many plans came from the cache."""
    records = phase["records"]
    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, latency, expected, *cached in records:  # a solve's record has cached
        by_kind[kind].append((status, latency, expected, *cached))
    kinds = {}
    for kind in [*KINDS, SOLVE] if with_solves else KINDS:
        rows = by_kind.get(kind, [])
        latencies = [latency for _, latency, *_ in rows]
        kinds[kind] = dict(
            requests=len(rows),
            statuses=dict(Counter(status for status, *_ in rows)),
            unexpected=sum(not ok for _, _, ok, *_ in rows),
            p50_ms=percentile(latencies, 0.5) * 1e3 if rows else None,
            p99_ms=percentile(latencies, 0.99) * 1e3 if rows else None,
        )
        if kind == SOLVE:
            kinds[kind]["cached"] = sum(bool(rest and rest[0]) for _, _, _, *rest in rows)
    return dict(
        requests=len(records),
        seconds=phase["elapsed"],
        throughput=len(records) / phase["elapsed"] if phase["elapsed"] else 0.0,
        statuses=dict(Counter(status for _, status, *_ in records)),
        unexpected=sum(not ok for _, _, _, ok, *_ in records),
        kinds=kinds,
        details=phase["details"],
    )


def table(summary: dict) -> str:
    lines = [
        "| kind | requests | p50 ms | p99 ms | statuses | unexpected |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for kind, k in summary["kinds"].items():
        statuses = _statuses(k)
        p50 = "—" if k["p50_ms"] is None else f"{k['p50_ms']:.1f}"
        p99 = "—" if k["p99_ms"] is None else f"{k['p99_ms']:.1f}"
        lines.append(
            f"| {kind} | {k['requests']} | {p50} | {p99} | {statuses} | {k['unexpected']} |"
        )
    statuses = ", ".join(f"{s} {n}" for s, n in sorted(summary["statuses"].items()))
    lines.append(f"| **all** | {summary['requests']} | | | {statuses} | {summary['unexpected']} |")
    return "\n".join(lines)


def compared(by_mix: dict[str, dict], finished: dict[str, Counter], seconds: float) -> dict:
    """Per mix: requests and run_small requests per second, counting those that finished
    within the `seconds` the mix ran (at the end of each part the clients also wait for
    the requests still in flight: long solves would stretch the time); run_small's
    p50/p99 latency; with solves the solve kind's outcomes. `change`: with solves
    against the standard mix."""
    rows = {}
    for name, mix in by_mix.items():
        small = mix["kinds"]["run_small"]
        rows[name] = dict(
            throughput=sum(finished[name].values()) / seconds,
            small_throughput=finished[name]["run_small"] / seconds,
            small_p50_ms=small["p50_ms"],
            small_p99_ms=small["p99_ms"],
            seconds=mix["seconds"],
            solve=mix["kinds"].get(SOLVE),
        )
    base, other = rows["standard"], rows["solves"]
    change = {
        key: other[key] / base[key] - 1 if base[key] and other[key] is not None else None
        for key in ("throughput", "small_throughput", "small_p50_ms", "small_p99_ms")
    }
    return dict(rows=rows, change=change, seconds=seconds)


def comparison(figures: dict) -> str:
    """The side-by-side table of `compared`, and the change in words."""

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    lines = [
        "| mix | req/s | run_small req/s | run_small p50 ms | run_small p99 ms | "
        "seconds (with the last requests) | solve outcomes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in figures["rows"].items():
        solve = row["solve"]
        lines.append(
            f"| {name} | {row['throughput']:.1f} | {row['small_throughput']:.1f} | "
            f"{ms(row['small_p50_ms'])} | {ms(row['small_p99_ms'])} | "
            f"{figures['seconds']:g} ({row['seconds']:.1f}) | "
            f"{_statuses(solve) if solve else '—'} |"
        )
    words = {
        "throughput": "req/s",
        "small_throughput": "run_small req/s",
        "small_p50_ms": "run_small p50",
        "small_p99_ms": "run_small p99",
    }
    lines.append(
        "\nwith solves: "
        + ", ".join(
            f"{words[key]} {'—' if value is None else f'{100 * value:+.0f}%'}"
            for key, value in figures["change"].items()
        )
        + " (req/s: requests finished within the mix's seconds)"
    )
    return "\n".join(lines)


def _statuses(k: dict) -> str:
    """Each status and its count; a solve's OK also how many plans came from the cache."""
    return ", ".join(
        f"{s} {n}" + (f" ({k['cached']} cached)" if s == "OK" and "cached" in k else "")
        for s, n in sorted(k["statuses"].items())
    )


def _merged(parts: list[dict]) -> dict:
    return {
        "records": [r for part in parts for r in part["records"]],
        "details": [d for part in parts for d in part["details"]],
        "elapsed": sum(part["elapsed"] for part in parts),
        "finished": sum((part.get("finished", Counter()) for part in parts), Counter()),
    }


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--solves",
        type=float,
        default=0.0,
        metavar="W",
        help="add the `solve` kind (exact solves and Budget searches) at weight W; the "
        "other kinds' weights sum to 1, so 0.05 makes about 5%% of the requests solves "
        "(default 0: none)",
    )
    parser.add_argument(
        "--compare-solves",
        action="store_true",
        help="measure --seconds of the standard mix and --seconds with solves (weight "
        f"--solves, else {COMPARE_WEIGHT:g}), in alternating parts against one server, "
        "and compare run_small's latency and throughput",
    )
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="start the server as `remat serve --host 127.0.0.1 --port 0 FLAG ...` "
        "(repeatable; give it with '=', e.g. --server-flag=--max-concurrent-solves=2); "
        "without any, a default ServerConfig in code (the same configuration)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.checks < 1:
        parser.error("--checks must be at least 1")
    if not 0 <= args.solves < math.inf:
        parser.error("--solves must be a weight >= 0")
    flags = [word for flag in args.server_flag for word in shlex.split(flag)]
    if any(flag.split("=")[0] == "--workers" for flag in flags):
        parser.error("--server-flag=--workers: the bench measures one server process's RSS")
    clients = args.clients or (4 if args.quick else 32)
    seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    env = dict(item.split("=", 1) for item in args.server_env)
    solve = args.solves or (COMPARE_WEIGHT if args.compare_solves else 0.0)
    # The measured mixes (name, solve weight), each run --checks times for its share.
    mixes = [("standard", 0.0), ("solves", solve)] if args.compare_solves else [("", solve)]
    warm_solve = 0.0 if args.compare_solves else solve
    share = f"weight {solve:g}, {100 * solve / (1 + solve):.1f}% of requests"

    processes = math.ceil(clients / THREADS_PER_PROCESS)
    if args.compare_solves:
        print(
            f"# load: {clients} clients ({processes} processes), {seconds:g} s of the "
            f"standard mix and {seconds:g} s with solves ({share}), alternating in "
            f"{args.checks} parts each, after a {warmup:g} s warm-up (standard mix), "
            f"seed {args.seed}\n"
        )
    else:
        print(
            f"# load: {clients} clients ({processes} processes) for {seconds:g} s after a "
            f"{warmup:g} s warm-up, seed {args.seed}"
            + (f"; solves: {share}" if solve else "")
            + "\n"
        )
    server_text = f"`{solves.command(flags)}`" if flags else "default ServerConfig (8 workers)"
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs "
        f"(clients and server share them; load average {os.getloadavg()[0]:.1f} at start); "
        f"server: {server_text}"
        + (f", {' '.join(f'{k}={v}' for k, v in env.items())}" if env else "")
        + "\n"
    )
    if solve:
        print(f"solve: {solves.DESCRIPTION}\n")
    launch = solves.remat_serve(flags, env) if flags else started(REMAT_SERVER, env)
    with launch as server:
        # they import while the server starts
        workers = Workers(clients, args.seed, with_solves=solve > 0)
        rss = RssSampler(server.pid)
        try:
            port = solves.serve_port(server) if flags else read_ports(server)[0]
            workers.connect(f"127.0.0.1:{port}")
            rss.start()
            rss_start = rss.idle(settle=0.0)
            rss.phase = "warmup"
            warm = summarize(workers.run(warmup, warm_solve), with_solves=warm_solve > 0)
            rss.phase = "idle"
            baseline = rss.idle(args.settle)
            idle, parts = [baseline], defaultdict(list)
            for _ in range(args.checks):  # idle readings along the way: a leak's trend
                for name, weight in mixes:
                    rss.phase = "measure"
                    parts[name].append(workers.run(seconds / args.checks, weight))
                    rss.phase = "idle"
                    idle.append(rss.idle(args.settle))
            final = idle[-1]
        finally:
            workers.close()
            rss.stop()
    measured = summarize(_merged([p for name, _ in mixes for p in parts[name]]), solve > 0)
    merged = {name: _merged(parts[name]) for name, _ in mixes}
    by_mix = {name: summarize(merged[name], weight > 0) for name, weight in mixes}
    if args.compare_solves:
        figures = compared(by_mix, {n: m["finished"] for n, m in merged.items()}, seconds)
    loaded = rss.of("measure") or [final]
    window = max(1, len(loaded) // 10)
    memory = dict(
        start=rss_start,
        baseline=baseline,
        final=final,
        idle=idle,
        peak=max(loaded),
        threads=rss.threads,
        mappings=rss.mappings,
        growth=final / baseline - 1,
        peak_growth=max(loaded) / baseline - 1,
        loaded_first=int(statistics.median(loaded[:window])),
        loaded_last=int(statistics.median(loaded[-window:])),
    )
    memory["loaded_growth"] = memory["loaded_last"] / memory["loaded_first"] - 1
    unexpected = warm["unexpected"] + measured["unexpected"]
    ok = unexpected == 0 and memory["growth"] < GROWTH_GOAL

    warm_text = f"warm-up: {warm['requests']} requests, {warm['unexpected']} unexpected"
    if args.compare_solves:
        for (name, _), title in zip(mixes, ("standard mix", f"with solves ({share})")):
            mix = by_mix[name]
            print(f"## {title}\n\n{table(mix)}")
            print(
                f"\n{mix['requests']} requests in {mix['seconds']:.1f} s: "
                f"{mix['throughput']:.1f} req/s\n"
            )
        print(f"## side by side ({warm_text})\n\n{comparison(figures)}\n")
    else:
        print(table(measured))
        within = ""
        if solve:  # long solves in flight at each part's end stretch the time
            done = sum(merged[""]["finished"].values())
            within = f"; {done} finished within the {seconds:g} s: {done / seconds:.1f} req/s"
        print(
            f"\n{measured['requests']} requests in {measured['seconds']:.1f} s: "
            f"{measured['throughput']:.1f} req/s{within} ({warm_text})\n"
        )
    part = seconds / args.checks
    marks = "/".join(f"{part * (i + 1):.3g}" for i in range(args.checks * len(mixes)))
    print(
        f"server RSS, idle (no request in flight): {rss_start / MiB:.1f} MiB at start, "
        f"{baseline / MiB:.1f} MiB after the warm-up (baseline), after {marks} s: "
        + " / ".join(f"{value / MiB:.1f}" for value in idle[1:])
        + f" MiB: growth {100 * memory['growth']:+.1f}%. Under load: peak "
        f"{memory['peak'] / MiB:.1f} MiB ({100 * memory['peak_growth']:+.1f}% of baseline); "
        f"median of the first / last 10% of samples {memory['loaded_first'] / MiB:.1f} / "
        f"{memory['loaded_last'] / MiB:.1f} MiB ({100 * memory['loaded_growth']:+.1f}%). "
        f"Server threads at those idle readings: {' / '.join(map(str, rss.threads))}. "
        "Idle RSS by kind of mapping, baseline -> final (MiB): "
        + ", ".join(
            f"{kind} {rss.mappings[1][kind] / MiB:.1f} -> {rss.mappings[-1][kind] / MiB:.1f}"
            for kind in rss.mappings[-1]
        )
        + "\n"
    )
    for detail in (warm["details"] + measured["details"])[:10]:
        print(f"- unexpected: {detail}")
    print(
        f"{'PASS' if ok else 'FAIL'}: {unexpected} unexpected outcomes (goal 0); RSS growth "
        f"{100 * memory['growth']:+.1f}% (goal < {100 * GROWTH_GOAL:.0f}%)"
    )
    report = dict(
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
    if solve or flags:
        report.update(solves=solve, server_flags=flags)
    if args.compare_solves:
        report.update(mixes=by_mix, comparison=figures)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
