"""Where one Run's time goes: SDK, transport, compile, plan, execute, encode.

    python bench/overhead.py            # chains of 1k/10k/100k nodes, an MLP, the goals
    python bench/overhead.py --quick    # smaller and fewer repeats (~30 s)
    python bench/overhead.py --smoke    # tiny: that it runs (tests/unit/test_bench_smoke.py)

Everything runs in this process: an in-process server (`remat.Client.in_process`, a
real gRPC server on loopback) whose pipeline functions are wrapped with timers from
the outside, so each request's time splits into phases:

- sdk: building the request and the graph's wire form, decoding the result (client);
- decode: the server parsing the graph reference and tensors;
- compile: validating and differentiating the graph (0 when cached);
- plan: planning and simulating the policy (0 when cached);
- execute: the executor's node evaluations;
- encode: the server writing the response;
- transport: the rest (gRPC, loopback, the handler thread's scheduling).

A *first* request sends a graph the server has never seen (each repetition renames
it, which changes its content id); a *repeated* one runs the same graph again. The
goals of issue 12 are checked side by side in one run and printed as ratios.
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it runs")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (default 7; 3 with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch contender")
    return parser.parse_args(argv)


if __name__ == "__main__":  # BLAS reads its thread count when it loads
    ARGS = parse_args()
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)

import contextlib  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent import futures  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import remat  # noqa: E402
from remat import calls, models  # noqa: E402
from remat import graph as sdk_graph  # noqa: E402
from remat_server.engine import compile as engine_compile  # noqa: E402
from remat_server.engine import run as engine_run  # noqa: E402
from remat_server.runtime import executor  # noqa: E402
from remat_server.service import servicer  # noqa: E402

PHASES = ("sdk", "transport", "decode", "compile", "plan", "execute", "encode")


# --- phase timers, wrapped around the pipeline from the outside ------------------------------
class Phases:
    """Seconds per phase of the request in flight (one at a time in this bench)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.seconds, self.marks = dict.fromkeys(PHASES, 0.0), {}

    def add(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def timing(self, phase: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return timed

    def marking(self, before: str, after: str, function: Callable) -> Callable:
        """Record when `function` starts and ends (for decode and encode)."""

        @functools.wraps(function)
        def marked(*args, **kwargs):
            self.marks[before] = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.marks[after] = time.perf_counter()

        return marked

    def marking_stream(self, before: str, after: str, function: Callable) -> Callable:
        """`marking` for a handler that yields its responses (RunStream)."""

        @functools.wraps(function)
        def marked(*args, **kwargs):
            self.marks[before] = time.perf_counter()
            try:
                yield from function(*args, **kwargs)
            finally:
                self.marks[after] = time.perf_counter()

        return marked


@contextlib.contextmanager
def instrumented(phases: Phases):
    """Wrap the SDK's and the server's stage functions with `phases`' timers."""
    patches = [
        (calls, "run_request", phases.timing("sdk", calls.run_request)),
        (calls, "run_result", phases.timing("sdk", calls.run_result)),
        (sdk_graph.Graph, "wire_form", phases.timing("sdk", sdk_graph.Graph.wire_form)),
        (engine_run.Engine, "compile", phases.timing("compile", engine_run.Engine.compile)),
        (engine_compile, "_plan", phases.timing("plan", engine_compile._plan)),
        (executor.Program, "run", phases.timing("execute", executor.Program.run)),
        (
            servicer.ExecutorServicer,
            "Run",
            phases.marking("handler", "handler_end", servicer.ExecutorServicer.Run),
        ),
        (
            servicer.ExecutorServicer,
            "RunStream",
            phases.marking_stream("handler", "handler_end", servicer.ExecutorServicer.RunStream),
        ),
        (
            servicer.ExecutorServicer,
            "_execute",
            phases.marking("engine", "engine_end", servicer.ExecutorServicer._execute),
        ),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def measure(phases: Phases, step: Callable[[], object]) -> dict[str, float]:
    """One request's phases; compile and plan come out of the engine's own time."""
    phases.reset()
    start = time.perf_counter()
    step()
    total = time.perf_counter() - start
    seconds, marks = dict(phases.seconds), phases.marks
    seconds["decode"] = marks["engine"] - marks["handler"]
    seconds["encode"] = marks["handler_end"] - marks["engine_end"]
    seconds["transport"] = total - seconds["sdk"] - (marks["handler_end"] - marks["handler"])
    seconds["total"] = total
    return seconds


# --- workloads -------------------------------------------------------------------------------
def chain(nodes: int, name: str = "chain") -> remat.Graph:
    """`nodes` graph nodes: x, then nodes - 2 adds of x, then the sum (the loss)."""
    g = remat.Graph(name)
    x = g.input("x", (1,), "float32")
    y = x
    for _ in range(nodes - 2):
        y = y + x
    g.output("loss", remat.sum(y))
    return g


def mlp(layers: int, batch: int) -> models.Model:
    # Activations (batch x 128 per layer) outweigh the parameters, so half of
    # store_all's peak is a budget a plan can meet.
    return models.mlp(batch=batch, widths=(128,) * layers + (10,))


@dataclass
class Row:
    name: str
    nodes: int
    first: list[dict] = field(default_factory=list)
    repeated: list[dict] = field(default_factory=list)


def median_phases(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def chain_row(
    client: remat.Client, phases: Phases, nodes: int, first_repeats: int, repeats: int
) -> Row:
    row = Row(f"chain {nodes // 1000}k" if nodes % 1000 == 0 else f"chain {nodes}", nodes)
    feed = {"x": np.ones(1, np.float32)}
    for k in range(first_repeats):
        g = chain(nodes, f"chain{nodes}-{k}")  # a new name: a graph the server never saw
        row.first.append(
            measure(
                phases,
                lambda g=g: client.run(g, feed, wrt=["x"], loss="loss", policy="store_all"),
            )
        )
    g = chain(nodes, f"chain{nodes}-repeated")
    client.run(g, feed, wrt=["x"], loss="loss", policy="store_all")
    for _ in range(repeats):
        row.repeated.append(
            measure(phases, lambda: client.run(g, feed, wrt=["x"], loss="loss", policy="store_all"))
        )
    return row


def model_row(client, phases, name: str, model: models.Model, policy, repeats: int) -> Row:
    row = Row(name, len(model.graph))
    for k in range(min(repeats, 3)):
        graph = remat.Graph(f"{model.graph.name}-{k}")
        graph._restore(model.graph.inputs, model.graph.nodes, model.graph.outputs)
        row.first.append(
            measure(
                phases,
                lambda graph=graph: client.run(
                    graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy
                ),
            )
        )
    client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy)
    for _ in range(repeats):
        row.repeated.append(
            measure(
                phases,
                lambda: client.run(
                    model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy
                ),
            )
        )
    return row


# --- the smallest Run against a bare gRPC echo ------------------------------------------------
def echo_server() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def smallest_run_vs_echo(client: remat.Client, calls_count: int) -> dict[str, float]:
    """p50 and p99 of the smallest Run (y = 2x on 1 float, no gradient) and of a bare
    gRPC echo of a message the same size as that Run's request, interleaved."""
    g = remat.Graph("smallest")
    y = g.input("x", (1,), "float32") * 2.0
    g.output("y", y)
    feed = {"x": np.ones(1, np.float32)}
    client.run(g, feed)
    request, _ = calls.run_request(calls.executor_pb2.GraphRef(graph_id=g.graph_id), g, feed)
    payload = request.SerializeToString()
    server, port = echo_server()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary("/bench.Echo/Echo")
        echo(payload)
        runs, echoes = [], []
        for _ in range(calls_count):
            start = time.perf_counter()
            client.run(g, feed)
            runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            echo(payload)
            echoes.append(time.perf_counter() - start)
    server.stop(None)
    return {
        "run_p50": _pct(runs, 50),
        "run_p99": _pct(runs, 99),
        "echo_p50": _pct(echoes, 50),
        "echo_p99": _pct(echoes, 99),
    }


def interleaved_steps(client, model: models.Model, policies: dict, repeats: int) -> dict:
    """Median seconds of a repeated step under each policy, the policies taking turns
    (each planned once first): a ratio of two of them is side by side, not minutes
    apart on a shared machine (the phase rows above run one policy after the other)."""

    def step(policy):
        client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy)

    for policy in policies.values():
        step(policy)
    seconds: dict[str, list[float]] = {name: [] for name in policies}
    for _ in range(max(repeats, 5)):
        for name, policy in policies.items():
            start = time.perf_counter()
            step(policy)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# --- torch ------------------------------------------------------------------------------------
def torch_chain_seconds(nodes: int, repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x = torch.ones(1, dtype=torch.float32, requires_grad=True)

    def step():
        y = x
        for _ in range(nodes - 2):
            y = y + x
        torch.autograd.grad(y.sum(), [x])

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- report -----------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = ["workload", "request", "total ms", "µs/node", *[f"{p} ms" for p in PHASES]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for kind, runs in (("first", row.first), ("repeated", row.repeated)):
            if not runs:
                continue
            m = median_phases(runs)
            cells = [
                row.name,
                kind,
                f"{m['total'] * 1e3:.2f}",
                f"{m['total'] * 1e6 / row.nodes:.1f}",
                *[f"{m[p] * 1e3:.2f}" for p in PHASES],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Sizes:
    chains: tuple[int, ...]  # the last one's first request is the µs-per-node goal
    versus_torch: int  # the chain compared with torch eager
    layers: int
    batch: int
    echo_calls: int
    repeats: int


def sizes_of(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        return Sizes((200, 1_000), 500, 16, 1024, 20, args.repeats or 2)
    if args.quick:
        return Sizes((1_000, 10_000), 2_000, 16, 1024, 100, args.repeats or 3)
    return Sizes((1_000, 10_000, 100_000), 2_000, 64, 2048, 500, args.repeats or 7)


def main(args: argparse.Namespace) -> dict:
    """Print the phase table and the goals; return them (rows and goals)."""
    size = sizes_of(args)
    repeats = size.repeats
    phases = Phases()
    config = remat_server_config()
    rows: list[Row] = []
    goals: list[tuple[str, float, float, str]] = []
    # Instrumented first: the server binds its handlers when it is created.
    with instrumented(phases), remat.Client.in_process(config) as client:
        client.run(chain(10, "warmup"), {"x": np.ones(1, np.float32)}, wrt=["x"], loss="loss")
        for nodes in size.chains:
            first = min(repeats, 3)  # the median of three: a first request is noisy
            rows.append(chain_row(client, phases, nodes, first, repeats if nodes < 100_000 else 3))
        two_k = chain_row(client, phases, size.versus_torch, 1, repeats)
        layers = size.layers
        model = mlp(layers, size.batch)
        store = model_row(
            client, phases, f"mlp {layers} layers, store_all", model, "store_all", repeats
        )
        budget = model_row(
            client,
            phases,
            f"mlp {layers} layers, budget:0.5",
            model,
            remat.policies.Budget(fraction=0.5),
            repeats,
        )
        rows += [two_k, store, budget]
    # Apart from the phase timers above: their wrappers would weigh on the smallest Run.
    with remat.Client.in_process(config) as client:
        small = smallest_run_vs_echo(client, size.echo_calls)
        steps = interleaved_steps(
            client,
            model,
            {"store_all": "store_all", "budget": remat.policies.Budget(fraction=0.5)},
            repeats,
        )
    print(table(rows))
    print()
    for row in rows:
        if row.first and row.repeated:
            first = median_phases(row.first)
            again = median_phases(row.repeated)
            goals.append(
                (
                    f"{row.name}: repeated planning / first (compile + plan)",
                    (again["compile"] + again["plan"]) / (first["compile"] + first["plan"]),
                    0.02,
                    "x",
                )
            )
    largest = rows[len(size.chains) - 1]
    goals.append(
        (
            f"{largest.name} first request, µs per graph node",
            median_phases(largest.first)["total"] * 1e6 / largest.nodes,
            30.0,
            "µs",
        )
    )
    if not args.no_torch:
        torch_seconds = torch_chain_seconds(size.versus_torch, repeats)
        if torch_seconds:
            goals.append(
                (
                    f"{two_k.name} repeated, end to end / torch eager forward+backward",
                    median_phases(two_k.repeated)["total"] / torch_seconds,
                    3.0,
                    "x",
                )
            )
    goals.append(
        (
            f"mlp {layers} layers repeated: budget:0.5 step / store_all step (interleaved)",
            steps["budget"] / steps["store_all"],
            1.3,
            "x",
        )
    )
    goals.append(
        ("smallest Run / bare gRPC echo, p50", small["run_p50"] / small["echo_p50"], 1.5, "x")
    )
    goals.append(
        (
            "smallest Run / bare gRPC echo, p99",
            small["run_p99"] / small["echo_p99"],
            float("nan"),
            "x",
        )
    )
    print("| goal | measured | target | met |\n|---|---|---|---|")
    for name, value, target, unit in goals:
        met = "-" if target != target else ("yes" if value <= target else "NO")
        shown = f"{value:.3f}" if unit == "x" else f"{value:.1f} {unit}"
        print(f"| {name} | {shown} | {'' if target != target else f'<= {target:g}'} | {met} |")
    print(
        f"\nsmallest Run p50 {small['run_p50'] * 1e6:.0f} µs, p99 {small['run_p99'] * 1e6:.0f} µs;"
        f" echo p50 {small['echo_p50'] * 1e6:.0f} µs, p99 {small['echo_p99'] * 1e6:.0f} µs"
    )
    return {"rows": rows, "goals": goals, "smallest": small}


def remat_server_config():
    from remat_server import ServerConfig

    return ServerConfig()


if __name__ == "__main__":
    main(ARGS)
