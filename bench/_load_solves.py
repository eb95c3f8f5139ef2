"""load.py's `solve` kind (exact solves and Budget searches among the small requests)
and its `remat serve` launcher (for `--server-flag`).

A solve plans `remat.models.cnn(channels=(3, 8, 16, 16), image=8)` (batch 8: 19
nodes, 50 in the joint graph) under a budget of `f` x store_all's peak, `f` one of
`FRACTIONS` (23 budgets between the lowest that fits and store_all's peak), with one of
  - `Optimal(fraction=f, time_limit=3)`: the exact MILP, 0.8-3 s alone here (median
    about 1 s; two fractions stop at the 3 s limit with a feasible plan);
  - `Budget(fraction=f)`: its search runs the same MILP under its own 2 s limit, 0.8-2 s;
  - `Budget(fraction=f, profile=True)`: the same search on op times measured on the
    request's inputs, so Run only; 0.5-2 s.
The server's compiled-request cache keeps the first two's plans, so repeats are answered
from it once the 46 are made (a continuous range of fractions would add a plan to the
cache with every request: growth a soak would count). A profiled Budget is never
cached: those keep searching for as long as the load runs. A solve is a Plan or a Run,
some with a client deadline, some cancelled through the raw stub.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np

MODEL = dict(channels=(3, 8, 16, 16), image=8)
FRACTIONS = tuple(round(0.91 + 0.004 * k, 3) for k in range(23))  # 0.910 ... 0.998
OPTIMAL_TIME_LIMIT = 3.0  # seconds: caps the MILP's slow fractions
POLICIES = {"optimal": 0.5, "budget": 0.25, "profiled": 0.25}  # shares among solves
# How the request is sent: as is, with a client deadline, or cancelled.
MANNERS = {"plain": 0.6, "deadline": 0.25, "cancel": 0.15}
RUN_SHARE = 0.25  # of the unprofiled solves (a profiled Budget is always a Run)
DEADLINE = (0.2, 3.0)  # client timeout, seconds
CANCEL_AFTER = (0.0, 1.5)  # the raw stub's future is cancelled after this long
# RESOURCE_EXHAUSTED: refused because too many solves wait (--max-queued-requests).
EXPECTED = {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"}
DESCRIPTION = (
    f"cnn(channels={MODEL['channels']}, image={MODEL['image']}) under optimal(f, "
    f"time_limit={OPTIMAL_TIME_LIMIT:g} s), budget(f) or budget(f, profile), f one of "
    f"{len(FRACTIONS)} fractions in {FRACTIONS[0]:.3f}-{FRACTIONS[-1]:.3f}"
)


class SolveWorkload:
    """The solve graph, its inputs and the gradients every schedule must compute."""

    def __init__(self):
        import remat
        from remat_server.engine import Engine, RunRequest
        from remat_server.graph.limits import Limits
        from remat_server.service.codec import graph_from_proto

        self.model = m = remat.models.cnn(**MODEL)
        spec = graph_from_proto(m.graph.to_proto(), Limits())
        reference = Engine().run(RunRequest(spec, m.inputs, wrt=tuple(m.wrt), loss=m.loss))
        self.expected = {
            **reference.outputs,
            **{f"grad/{k}": v for k, v in reference.grads.items()},
        }


def _draw(rng: random.Random, shares: dict[str, float]) -> str:
    return rng.choices(list(shares), list(shares.values()))[0]


def _policy(rng: random.Random):
    """(a policy, whether it must go by Run)."""
    from remat import policies

    kind, fraction = _draw(rng, POLICIES), rng.choice(FRACTIONS)
    if kind == "optimal":
        return policies.Optimal(fraction=fraction, time_limit=OPTIMAL_TIME_LIMIT), False
    return policies.Budget(fraction=fraction, profile=kind == "profiled"), kind == "profiled"


def _over_budget(peak: int, planner) -> str | None:
    if planner is None:
        return "solve: the answer has no planner report"
    if planner.budget_bytes and peak > planner.budget_bytes:
        return f"solve: peak {peak:,} bytes over the budget of {planner.budget_bytes:,}"
    return None


def _check_run(work: SolveWorkload, result) -> str | None:
    got = {**result.outputs, **{f"grad/{k}": v for k, v in result.grads.items()}}
    for name, expected in work.expected.items():
        if name not in got or not np.allclose(got[name], expected, rtol=1e-5, atol=1e-6):
            return f"solve: run's '{name}' differs from the in-process engine's (store_all)"
    return _over_budget(result.metrics.peak_bytes, result.metrics.planner)


def _cancelled(work: SolveWorkload, stub, policy, run: bool, rng: random.Random) -> str:
    """A Plan or Run through the raw stub's future, cancelled after a random delay."""

    from remat import calls
    from remat_proto.v1 import executor_pb2
    from remat_proto.wire import policy_to_proto

    m = work.model
    ref = executor_pb2.GraphRef(graph=m.graph.to_proto())
    if run:
        request, _ = calls.run_request(
            ref, m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy=policy, stream=False
        )
        future = stub.Run.future(request)
    else:
        request = executor_pb2.PlanRequest(
            graph=ref, wrt=list(m.wrt), loss=m.loss, policy=policy_to_proto(policy)
        )
        future = stub.Plan.future(request)
    return cancelled_after(future, rng.uniform(*CANCEL_AFTER))


def cancelled_after(future, seconds: float) -> str:
    """The status of a call future cancelled `seconds` after it started (it may finish
    first: then its own status)."""
    time.sleep(seconds)
    future.cancel()
    try:
        future.result()
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def one(work: SolveWorkload, client, stub, rng: random.Random) -> tuple[str, str | None, bool]:
    """One solve: (status, what was wrong or None, whether the plan came from the cache)."""
    import remat

    policy, run = _policy(rng)
    run = run or rng.random() < RUN_SHARE
    manner = _draw(rng, MANNERS)
    m = work.model
    try:
        if manner == "cancel":
            return _cancelled(work, stub, policy, run, rng), None, False
        timeout = rng.uniform(*DEADLINE) if manner == "deadline" else None
        if run:
            result = client.run(
                m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy=policy, timeout=timeout
            )
            return "OK", _check_run(work, result), result.metrics.plan_cached
        result = client.plan(m.graph, wrt=m.wrt, loss=m.loss, policy=policy, timeout=timeout)
        return "OK", _over_budget(result.peak_bytes, result.planner), result.plan_cached
    except remat.RematError as error:
        wrong = None if error.code in EXPECTED else f"solve: {error}"
        if error.code == "RESOURCE_EXHAUSTED" and "no schedule fits" in str(error):
            wrong = f"solve: every fraction should fit: {error}"  # not a refusal
        return error.code, wrong, False


# --- `remat serve` with the bench's --server-flag ------------------------------------------------
SERVE = ("-m", "remat.cli", "serve", "--host", "127.0.0.1", "--port", "0")


@contextlib.contextmanager
def remat_serve(flags: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """`remat serve --host 127.0.0.1 --port 0 FLAGS` in a new process (read its port
    with `serve_port`); SIGTERM (a drain) on leaving, SIGKILL if it outlasts 30 s."""
    import os

    proc = subprocess.Popen(
        [sys.executable, *SERVE, *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_port(proc: subprocess.Popen) -> int:
    """Wait for `remat serve`'s "remat server listening on HOST:PORT" line; the port."""
    for line in proc.stdout:
        found = re.search(r"listening on \S+:(\d+)", line)
        if found:
            return int(found.group(1))
    raise RuntimeError(f"remat serve exited with {proc.wait()} before listening")


def command(flags: list[str]) -> str:
    return "remat " + " ".join(SERVE[2:] + tuple(flags))
