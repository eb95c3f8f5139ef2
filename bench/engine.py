"""remat's store-all forward+backward time against PyTorch eager on the CPU.

    python bench/engine.py [--quick] [--threads N] [--repeats R] [--fast-malloc] [--profile]

Workloads: an MLP and a transformer block (`remat.models`), and a chain of N tiny
adds for the per-node overhead. Repeats of every contender are interleaved in one
run (torch, engine, end-to-end, torch, ...) so drift hits them alike; medians are
reported as a Markdown table. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats (smoke test)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads for both torch and NumPy's BLAS (default 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per contender (default 7, or 3 with --quick)",
    )
    parser.add_argument(
        "--chain",
        type=int,
        default=None,
        help="adds in the per-node chain (default 5000; 1000 with --quick)",
    )
    parser.add_argument(
        "--fast-malloc",
        action="store_true",
        help="serve with glibc's thresholds at 32 MiB (mmap) and 64 MiB (trim) instead of the "
        "server's default 4 MiB: freed buffers reused, RSS less flat "
        "(see remat_server.runtime.allocator)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where remat's engine time goes (per op and cProfile)",
    )
    return parser.parse_args()


# BLAS reads its thread count when the library loads: set it before numpy or torch.
if __name__ == "__main__":
    ARGS = _parse_args()
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)

import cProfile  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import remat  # noqa: E402
from remat import models  # noqa: E402
from remat_server import ServerConfig  # noqa: E402
from remat_server.engine import Engine, RunRequest  # noqa: E402
from remat_server.engine import compile as compile_module  # noqa: E402
from remat_server.engine import run as run_module  # noqa: E402
from remat_server.graph.limits import Limits  # noqa: E402
from remat_server.runtime import executor as executor_module  # noqa: E402
from remat_server.service.codec import graph_from_proto  # noqa: E402


# --- workloads: a remat model and the same function in torch --------------------------------
@dataclass
class Workload:
    name: str
    model: models.Model
    torch_loss: Callable[[dict], torch.Tensor]


def torch_mlp(widths, l2):
    def loss(t):
        h, penalty = t["x"], 0.0
        for i in range(len(widths) - 1):
            h = h @ t[f"w{i}"] + t[f"b{i}"]
            if i < len(widths) - 2:
                h = torch.tanh(h)
            penalty = penalty + torch.sum(t[f"w{i}"] * t[f"w{i}"])
        return F.cross_entropy(h, t["labels"]) + penalty * l2

    return loss


def torch_transformer_block(heads):
    def loss(t):
        x = t["x"]
        batch, seq, d_model = x.shape
        d_head = d_model // heads

        def split(u):
            return u.reshape(batch, seq, heads, d_head).permute(0, 2, 1, 3)

        h = F.layer_norm(x, (d_model,), t["ln1_w"], t["ln1_b"], eps=1e-5)
        q, k, v = (split(h @ t[w]) for w in ("wq", "wk", "wv"))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d_head)), dim=-1)
        h = x + (attn @ v).permute(0, 2, 1, 3).reshape(batch, seq, d_model) @ t["wo"]
        m = F.gelu(
            F.layer_norm(h, (d_model,), t["ln2_w"], t["ln2_b"], eps=1e-5) @ t["w1"] + t["b1"],
            approximate="tanh",
        )
        y = h + (m @ t["w2"] + t["b2"])
        return torch.mean(y * y)

    return loss


def workloads(quick: bool) -> list[Workload]:
    if quick:
        mlp = dict(batch=64, widths=(256, 512, 512, 10))
        block = dict(batch=2, seq=32, d_model=64, heads=4, d_ff=256)
    else:
        mlp = dict(batch=256, widths=(1024, 2048, 2048, 10))
        block = dict(batch=8, seq=128, d_model=256, heads=8, d_ff=1024)
    widths = mlp["widths"]
    return [
        Workload(
            f"mlp b{mlp['batch']} {'-'.join(map(str, widths))}",
            models.mlp(**mlp, dtype="float32"),
            torch_mlp(widths, 1e-4),
        ),
        Workload(
            f"transformer b{block['batch']} s{block['seq']} d{block['d_model']} "
            f"h{block['heads']} ff{block['d_ff']}",
            models.transformer_block(**block, dtype="float32"),
            torch_transformer_block(block["heads"]),
        ),
    ]


# --- the contenders ------------------------------------------------------------------------
def torch_step(workload: Workload) -> Callable[[], float]:
    tensors = {
        name: torch.from_numpy(value).requires_grad_(name in workload.model.wrt)
        for name, value in workload.model.inputs.items()
    }
    params = [tensors[name] for name in workload.model.wrt]

    def step() -> float:
        loss = workload.torch_loss(tensors)
        torch.autograd.grad(loss, params)  # no .grad accumulation between repeats
        return loss.item()

    return step


def engine_request(model: models.Model) -> RunRequest:
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    return RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss)


def engine_step(engine: Engine, request: RunRequest, executed: list[float]) -> Callable[[], float]:
    def step() -> float:
        result = engine.run(request)
        executed.append(result.metrics.forward_seconds + result.metrics.backward_seconds)
        return float(result.outputs[request.loss])

    return step


def client_step(
    client: remat.Client, model: models.Model, served: list[float]
) -> Callable[[], float]:
    """One request through the in-process server, as a training loop makes it: each
    step receives into the previous step's result (`out=`). `served` collects the engine
    time the server reports (on its handler thread)."""
    last: list = [None]

    def step() -> float:
        result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss, out=last[0])
        last[0] = result
        served.append(result.metrics.total_seconds)
        return float(result.outputs[model.loss])

    return step


def timed(step: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = step()
    return time.perf_counter() - start, value


def interleaved(
    steps: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run each step `warmup` times, then `repeats` rounds of one call each, in turn."""
    values = {}
    for name, step in steps.items():
        for _ in range(warmup):
            values[name] = step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            elapsed, values[name] = timed(step)
            seconds[name].append(elapsed)
    return seconds, values


# --- per-node overhead ------------------------------------------------------------------
def chain_model(n: int) -> models.Model:
    """y = x + x + ... (n adds) on shape (1,); loss = sum(y). Backward sums n grads."""
    g = remat.Graph(f"chain{n}")
    x = g.input("x", (1,), "float64")
    y = x
    for _ in range(n):
        y = remat.add(y, x)
    g.output("loss", remat.sum(y))
    return models.Model(g, {"x": np.ones(1)}, ["x"])


def torch_chain(n: int) -> Callable[[], float]:
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)

    def step() -> float:
        y = x
        for _ in range(n):
            y = y + x
        loss = y.sum()
        torch.autograd.grad(loss, [x])
        return loss.item()

    return step


# --- profiling ------------------------------------------------------------------------------
def op_breakdown(engine: Engine, request: RunRequest) -> str:
    """Where one Engine.run spends its time: per pipeline stage, and per (op, phase)
    inside the executor, by wrapping the engine's and the executor's functions. The
    run is a first one (a fresh engine: nothing cached), so compiling shows."""
    stages: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    forward = {node.name for node in request.graph.nodes}
    patched = [
        (run_module, "validate", "validate"),
        (run_module, "compile_request", "differentiate"),
        (compile_module, "_plan", "plan + simulate"),
        (executor_module.Program, "run", "execute"),
        (run_module, "nonfinite_warnings", "nonfinite"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    run_node = executor_module._run_node

    def wrap_stage(stage, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - start

        return wrapped

    def timed_run_node(node, *args):
        start = time.perf_counter()
        try:
            return run_node(node, *args)
        finally:
            entry = ops[(node.op, "forward" if node.name in forward else "backward")]
            entry[0] += time.perf_counter() - start
            entry[1] += 1

    for (owner, name, stage), (_, _, fn) in zip(patched, originals):
        setattr(owner, name, wrap_stage(stage, fn))
    executor_module._run_node = timed_run_node
    try:
        total = timed(lambda: Engine().run(request))[0]
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        executor_module._run_node = run_node
    kernels = sum(seconds for seconds, _ in ops.values())
    lines = [
        f"Engine.run (first request) {total * 1e3:.1f} ms; node kernels "
        f"{kernels * 1e3:.1f} ms ({100 * kernels / total:.0f}%). Stages: "
        + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in stages.items()),
        "",
        "| op | phase | nodes | ms | share of run |",
        "|---|---|---:|---:|---:|",
    ]
    for (op, phase), (seconds, count) in sorted(ops.items(), key=lambda item: -item[1][0])[:12]:
        lines.append(
            f"| {op} | {phase} | {count} | {seconds * 1e3:.2f} | {100 * seconds / total:.1f}% |"
        )
    return "\n".join(lines)


def cprofile_top(step: Callable[[], float], limit: int = 15) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(step)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    return text[text.find("   ncalls") :].rstrip()


# --- main -------------------------------------------------------------------------------------
def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> int:
    torch.set_num_threads(ARGS.threads)
    repeats = ARGS.repeats or (3 if ARGS.quick else 7)
    chain = ARGS.chain or (1000 if ARGS.quick else 5000)
    engine = Engine()
    print(
        f"# remat engine vs torch eager (CPU, {ARGS.threads} thread(s), store_all, "
        f"median of {repeats})\n"
    )
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}, "
        f"torch threads {torch.get_num_threads()}, OPENBLAS/OMP/MKL threads {ARGS.threads}\n"
    )
    rows, profiles = [], []
    config = ServerConfig()
    if ARGS.fast_malloc:
        config = replace(
            config, malloc_mmap_threshold_bytes=32 << 20, malloc_trim_threshold_bytes=64 << 20
        )
    print(
        f"glibc thresholds (process-wide, so the engine columns too): mmap "
        f"{config.malloc_mmap_threshold_bytes >> 20} MiB, trim "
        f"{config.malloc_trim_threshold_bytes >> 20} MiB\n"
    )
    with remat.Client.in_process(config) as client:
        for workload in workloads(ARGS.quick):
            request, executed, served = engine_request(workload.model), [], []
            seconds, values = interleaved(
                {
                    "torch": torch_step(workload),
                    "engine": engine_step(engine, request, executed),
                    "e2e": client_step(client, workload.model, served),
                },
                repeats,
            )
            agree = math.isclose(values["torch"], values["engine"], rel_tol=1e-4)
            t, e, c = (median_ms(seconds[k]) for k in ("torch", "engine", "e2e"))
            x = statistics.median(executed[-repeats:]) * 1e3
            h = statistics.median(served[-repeats:]) * 1e3
            rows.append(
                f"| {workload.name} | {t:.1f} | {e:.1f} | {x:.1f} | {h:.1f} | {c:.1f} | "
                f"{e / t:.2f} | {h / e:.2f} | {c / t:.2f} | "
                f"{'yes' if agree else 'NO'} |"
            )
            if ARGS.profile:
                profiles.append(
                    (
                        workload.name,
                        op_breakdown(engine, request),
                        cprofile_top(engine_step(engine, request, [])),
                    )
                )

        model = chain_model(chain)
        request, executed = engine_request(model), []
        step = engine_step(engine, request, executed)
        seconds, _ = interleaved({"torch": torch_chain(chain), "engine": step}, repeats)
        nodes = engine.run(request).metrics.nodes_computed
        torch_ops = 2 * chain + 1  # forward adds + sum; backward is comparable in torch
        overhead = (
            f"| chain of {chain} adds, shape (1,) | {nodes} | "
            f"{median_ms(seconds['engine']) * 1e3 / nodes:.1f} | "
            f"{statistics.median(executed[-repeats:]) * 1e6 / nodes:.1f} | "
            f"{median_ms(seconds['torch']) * 1e3 / torch_ops:.1f} |"
        )
        if ARGS.profile:
            profiles.append(
                (f"chain of {chain}", op_breakdown(engine, request), cprofile_top(step))
            )

    print(
        "| workload | torch eager ms | remat engine ms | engine exec ms | server engine ms "
        "| remat e2e ms | engine / torch | server / engine | e2e / torch | losses agree |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print("\n| per-node overhead | nodes executed | engine µs/node | exec µs/node | torch µs/op |")
    print("|---|---:|---:|---:|---:|")
    print(overhead)
    for name, breakdown, top in profiles:
        print(f"\n## where the engine's time goes: {name}\n\n{breakdown}\n\n```\n{top}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
