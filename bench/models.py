"""The model zoo (tests/zoo.py) in remat against PyTorch: step time and peak memory.

    python bench/models.py [--models resnet,gpt2] [--repeats R] [--quick] [--json PATH]

For each zoo model, at a batch where a torch eager training step takes 50 ms or more
here (`BATCHES`), float32, one thread on each side:

1. remat's store_all step (imported with `remat.from_torch`, run through an in-process
   server as a training loop would: `Client.in_process().run(..., out=previous)`)
   against torch eager's forward+backward of the same loss (in a helper process, out of
   reach of the server's process-wide malloc settings); the ratio of the medians of
   interleaved repeats;
2. the step's peak RSS for each, each in a fresh process (bench/_zoo_worker.py), and
   remat's predicted peak; also remat's engine alone (`Engine.run`, no gRPC);
3. remat at budget:0.5 against torch.utils.checkpoint around every block (the blocks are
   bench/_zoo_case.py's BLOCKS table); and remat with a byte budget equal to what
   torch's checkpointing measured. Where no schedule fits 0.5, "does not fit" and the
   floor: recompute_all's predicted peak as a fraction of store_all's.

Prints Markdown tables; see bench/README.md ("models.py: the zoo") for the method.
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=None, help="comma-separated zoo models (default: all of BATCHES)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per contender (default 5; --quick 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny batches: that it runs (a smoke test)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads for both torch and NumPy's BLAS (default 1)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory workers run at once (default 2; each measures its own process's peak, "
        "so they do not disturb each other's numbers; times are measured here, alone)",
    )
    parser.add_argument("--json", default=None, help="also write every measurement here")
    return parser.parse_args(argv)


# BLAS reads its thread count when the library loads: set it before numpy or torch.
if __name__ == "__main__":
    ARGS = parse_args()
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _procmem import MiB, reset_works  # noqa: E402  (bench/ is sys.path[0])
from _zoo_case import Case, RematCase, describe_blocks, remat_step  # noqa: E402
from engine import interleaved  # noqa: E402

import remat  # noqa: E402

# The batch of each model: a round size at which torch eager's training step (forward +
# backward of the loss, float32, 1 thread) took at least 50 ms on this machine (2 shared
# cores), with a margin for noise. The zoo's models are narrow (8-32 channels or
# features), and the language models' sequence is 8 tokens, so the batches are large.
# Measured when chosen (median of 3 to 5 steps):
#
# | model  | batch | torch eager ms | smaller batches |
# |--------|------:|---------------:|-----------------|
# | resnet |  1024 |             60 | 768: 45         |
# | unet   |   512 |             64 | 384: 48         |
# | gpt2   |   768 |             70 |                 |
# | bert   |  1536 |             78 |                 |
# | llama  |  1024 |             83 |                 |
BATCHES = {"resnet": 1024, "unet": 512, "gpt2": 768, "bert": 1536, "llama": 1024}
QUICK_BATCHES = {"resnet": 8, "unet": 4, "gpt2": 8, "bert": 8, "llama": 16}
BUDGET = remat.policies.Budget(fraction=0.5)
WORKER = Path(__file__).with_name("_zoo_worker.py")
PATHS = (
    "remat: `remat.Client.in_process().run(graph, feeds, wrt, loss, policy, out=previous)`, "
    "a real gRPC server on loopback in this process (bench/engine.py's `remat e2e`); "
    "`server ms` is the server's own `metrics.total_seconds` of the same calls. torch: "
    "`torch.autograd.grad(loss, params + float inputs)` in a helper process under glibc's "
    "default malloc (the in-process server fixes glibc's thresholds process-wide), one "
    "step per request over a pipe, interleaved with remat's"
)


# --- memory: one fresh process per configuration ----------------------------------------------
def run_worker(config: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(config)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"  worker failed ({config}):\n{tail}", file=sys.stderr)
        return {"failed": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_mib(r: dict | None) -> float | None:
    """The measured step's peak RSS over the worker's baseline (after imports, the
    model, its inputs and, for remat, the imported graph and its feeds)."""
    if not r or "peak" not in r:
        return None
    return (r["peak"] - r["rss_built"]) / MiB


# --- time: every contender of a model interleaved, remat here, torch in a helper -------------
class TorchSide:
    """torch's steps in a helper process (bench/_zoo_worker.py, "serve"), under glibc's
    default malloc: an in-process remat server fixes glibc's thresholds for its whole
    process (4 MiB), which slows torch eager 1.5-3.5x here. step(label) returns a
    callable that runs one step there and returns its loss; the timer here pays a pipe
    round trip (well under a millisecond) on top."""

    def __init__(self, config: dict):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(dict(config, serve=True))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the torch helper process did not start")

    def step(self, label: str):
        def run() -> float:
            self.proc.stdin.write(label + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"the torch helper process died during {label!r}")
            return json.loads(answer)["loss"]

        return run

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def timed_steps(
    client: remat.Client, config: dict, rc: RematCase, policies: dict[str, object], repeats: int
) -> dict:
    """Median seconds and last loss of each contender, in interleaved rounds: torch
    eager and checkpointed (in a helper process), then remat under each of `policies`
    (label -> policy); remat's also with the server's own median seconds."""
    served: dict[str, list[float]] = {label: [] for label in policies}

    def remat_contender(label, policy):
        run = remat_step(client, rc, policy)

        def step() -> float:
            result = run()
            served[label].append(result.metrics.total_seconds)
            return float(result.outputs["loss"])

        return step

    torch_side = TorchSide(config)
    try:
        steps = {label: torch_side.step(label) for label in ("torch eager", "torch checkpoint")}
        steps.update({label: remat_contender(label, p) for label, p in policies.items()})
        seconds, losses = interleaved(steps, repeats)
    finally:
        torch_side.close()
    return {
        label: dict(
            seconds=statistics.median(seconds[label]),
            samples=seconds[label],
            loss=losses[label],
            server_seconds=statistics.median(served[label][-repeats:]) if label in served else None,
        )
        for label in steps
    }


def plan_peak(client: remat.Client, rc: RematCase, policy) -> int | None:
    """remat's predicted peak under `policy` (a dry run), or None if no schedule fits."""
    try:
        return client.plan(rc.graph, wrt=rc.wrt, loss="loss", policy=policy).peak_bytes
    except remat.ResourceExhaustedError:
        return None


def measure_model(client, name: str, batch: int, args, hwm_reset: bool) -> dict:
    started = time.perf_counter()
    case = Case.build(name, batch)
    rc = RematCase.build(case)
    store_all = plan_peak(client, rc, "store_all")
    floor = plan_peak(client, rc, "recompute_all")
    fits = plan_peak(client, rc, BUDGET) is not None
    base = dict(model=name, batch=batch, threads=args.threads, hwm_reset=hwm_reset)
    configs = {
        "torch eager": dict(base, framework="torch", mode="eager"),
        "torch checkpoint": dict(base, framework="torch", mode="checkpoint"),
        "store_all": dict(base, framework="remat", mode="store_all"),
        "engine store_all": dict(base, framework="engine", mode="store_all"),
    }
    if fits:
        configs["budget:0.5"] = dict(base, framework="remat", mode="budget:0.5")
    with ThreadPoolExecutor(args.jobs) as pool:
        memory = dict(zip(configs, pool.map(run_worker, configs.values())))
    # remat given the memory torch's checkpointing used: its step's peak above the
    # baseline, plus the inputs remat's budget counts (parameters, buffers, data, R).
    policies = {"store_all": "store_all"}
    if fits:
        policies["budget:0.5"] = BUDGET
    torch_ckpt = step_mib(memory["torch checkpoint"])
    at_torch = None
    if torch_ckpt is not None:
        at_torch = int(max(torch_ckpt, 0) * MiB) + rc.input_bytes()
        policy = remat.policies.Budget(bytes=at_torch)
        if plan_peak(client, rc, policy) is not None:
            label = "budget=torch checkpoint"
            memory[label] = run_worker(dict(base, framework="remat", mode=f"budget:{at_torch}B"))
            policies[label] = policy
    times = timed_steps(client, base, rc, policies, args.repeats)
    reference = times["torch eager"]["loss"]
    agree = all(math.isclose(t["loss"], reference, rel_tol=1e-3) for t in times.values())
    return dict(
        model=name,
        batch=batch,
        blocks=describe_blocks(name),
        input_bytes=rc.input_bytes(),
        nodes=len(rc.graph.nodes),
        predicted={"store_all": store_all, "recompute_all": floor},
        floor=floor / store_all,
        fits=fits,
        budget_at_torch=at_torch,
        memory=memory,
        times=times,
        losses_agree=agree,
        seconds=time.perf_counter() - started,
    )


# --- tables -------------------------------------------------------------------------------------
def _f(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}"


def _ms(row: dict, label: str) -> float | None:
    t = row["times"].get(label)
    return t["seconds"] * 1e3 if t else None


def _predicted(row: dict, label: str) -> float | None:
    r = row["memory"].get(label) or {}
    return r["predicted_peak_bytes"] / MiB if "predicted_peak_bytes" in r else None


def store_all_table(rows: list[dict]) -> str:
    head = (
        "| model | batch | torch eager ms | remat store_all ms | server ms | remat / torch "
        "| torch peak MiB | remat peak MiB | remat / torch | engine-only peak MiB "
        "| remat predicted MiB | predicted − inputs MiB | losses agree |"
    )
    lines = [head, "|---|---:|" + "---:|" * 10 + "---|"]
    for r in rows:
        mem = r["memory"]
        t, s = _ms(r, "torch eager"), _ms(r, "store_all")
        tm, sm = step_mib(mem["torch eager"]), step_mib(mem["store_all"])
        predicted = _predicted(r, "store_all")
        server = r["times"]["store_all"]["server_seconds"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {_f(t)} | {_f(s)} | {_f(server * 1e3)} "
            f"| {_ratio(s, t)} | {_f(tm)} | {_f(sm)} | {_ratio(sm, tm)} "
            f"| {_f(step_mib(mem.get('engine store_all')))} | {_f(predicted)} "
            f"| {_f(predicted and predicted - r['input_bytes'] / MiB)} "
            f"| {'yes' if r['losses_agree'] else 'NO'} |"
        )
    return "\n".join(lines)


def budget_table(rows: list[dict]) -> str:
    head = (
        "| model | torch: checkpointed blocks | torch ckpt ms | × eager | torch ckpt peak MiB "
        "| × eager | remat budget:0.5 ms | × store_all | remat peak MiB | × store_all "
        "| remat predicted MiB | time remat / torch ckpt | peak remat / torch ckpt "
        "| floor (recompute_all / store_all, predicted) |"
    )
    lines = [head, "|---|---|" + "---:|" * 12]
    for r in rows:
        mem = r["memory"]
        c, e = _ms(r, "torch checkpoint"), _ms(r, "torch eager")
        cm, em = step_mib(mem["torch checkpoint"]), step_mib(mem["torch eager"])
        cells = [r["model"], r["blocks"], _f(c), _ratio(c, e), _f(cm), _ratio(cm, em)]
        if r["fits"]:
            b, s = _ms(r, "budget:0.5"), _ms(r, "store_all")
            bm, sm = step_mib(mem["budget:0.5"]), step_mib(mem["store_all"])
            cells += [_f(b), _ratio(b, s), _f(bm), _ratio(bm, sm), _f(_predicted(r, "budget:0.5"))]
            cells += [_ratio(b, c), _ratio(bm, cm)]
        else:
            cells += ["does not fit"] + ["—"] * 6
        cells.append(f"{r['floor']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_torch_table(rows: list[dict]) -> str:
    label = "budget=torch checkpoint"
    head = (
        "| model | budget MiB (torch ckpt peak + inputs) | remat ms | torch ckpt ms "
        "| time remat / torch ckpt | remat peak MiB | torch ckpt peak MiB "
        "| peak remat / torch ckpt | remat predicted MiB |"
    )
    lines = [head, "|---|" + "---:|" * 8]
    for r in rows:
        if r["budget_at_torch"] is None:
            continue
        c, cm = _ms(r, "torch checkpoint"), step_mib(r["memory"]["torch checkpoint"])
        cells = [r["model"], _f(r["budget_at_torch"] / MiB)]
        if label in r["times"]:
            b, bm = _ms(r, label), step_mib(r["memory"][label])
            cells += [_f(b), _f(c), _ratio(b, c), _f(bm), _f(cm), _ratio(bm, cm)]
            cells.append(_f(_predicted(r, label)))
        else:
            cells += ["does not fit", _f(c), "—", "—", _f(cm), "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    """Measure, print the tables, return {"rows": [...], ...}."""
    torch.set_num_threads(args.threads)
    batches = QUICK_BATCHES if args.quick else BATCHES
    names = args.models.split(",") if args.models else list(batches)
    unknown = [n for n in names if n not in batches]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(batches)}")
    args.repeats = args.repeats or (1 if args.quick else 5)
    hwm_reset = reset_works()
    started = time.perf_counter()
    print(
        f"# the zoo: remat vs PyTorch (CPU, float32, {args.threads} thread(s), "
        f"median of {args.repeats} interleaved repeats{', --quick' if args.quick else ''})\n"
    )
    print(
        f"torch {torch.__version__}, transformers {metadata.version('transformers')}, numpy "
        f"{metadata.version('numpy')}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start); "
        f"OMP/OPENBLAS/MKL_NUM_THREADS and torch.set_num_threads = {args.threads}\n"
    )
    print(f"{PATHS}.\n")
    print(
        "peak MiB: the step's peak RSS in a fresh process over its RSS once the model and its "
        "inputs were built (bench/_zoo_worker.py); "
        + (
            "VmHWM reset before the measured step (checked: works here)\n"
            if hwm_reset
            else "WARNING: VmHWM cannot be reset here, so peaks include the warm-up step\n"
        )
    )
    rows, failed = [], []
    with remat.Client.in_process() as client:
        for name in names:
            try:
                row = measure_model(client, name, batches[name], args, hwm_reset)
            except (remat.RematError, RuntimeError) as error:  # an op missing, a bad import
                failed.append((name, f"{type(error).__name__}: {str(error).splitlines()[0]}"))
                print(f"  {name}: FAILED {failed[-1][1]}", file=sys.stderr, flush=True)
                continue
            print(
                f"  {name} b{row['batch']}: {row['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    print("## store_all against torch eager\n")
    print(store_all_table(rows) + "\n")
    print("## budget:0.5 against torch.utils.checkpoint per block\n")
    print(budget_table(rows) + "\n")
    print("## remat given torch checkpointing's measured peak\n")
    print(at_torch_table(rows) + "\n")
    slow = [r["model"] for r in rows if r["times"]["torch eager"]["seconds"] < 0.05]
    if slow and not args.quick:
        print(f"NOTE: torch eager took under 50 ms here for {', '.join(slow)}: raise BATCHES\n")
    for name, error in failed:
        print(f"FAILED {name}: {error}\n")
    print(f"total {time.perf_counter() - started:.0f} s")
    report = {"rows": rows, "failed": failed, "repeats": args.repeats, "threads": args.threads}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(ARGS)
