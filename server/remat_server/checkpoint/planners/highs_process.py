"""HiGHS runs, here or in a child process the caller can kill.

A MILP solve must stop when its request ends, but HiGHS polls its interrupt callback
only between the steps of its branch and bound: presolve and the LP solves inside the
MIP poll nothing (HiGHS issue 1905), and presolve ignores the time limit too. On the
largest models that is a minute (about 8 s presolving a 115-node transformer block,
57 s a 242-node MLP, HiGHS 1.16). And a big solve's memory stays in the solving
process's heap afterwards (glibc keeps it), where it would spoil the server's RSS.

So `run_in_child` solves in a process of its own: the parent waits for the reply 50 ms
at a time and, once `stopped()` turns true or a hard wall limit passes, kills the child.
The child's memory goes back to the system when it exits. `run` solves in this process
with the interrupt callback: for small models, whose every stretch without a poll is
short, and for which a process (15-25 ms) would cost more than the solve.

    >>> import numpy as np
    >>> model = Model(  # minimise x0 + x1 such that x0 + x1 >= 1, x binary
    ...     cost=np.ones(2), lb=np.zeros(2), ub=np.ones(2),
    ...     lower=np.ones(1), upper=np.full(1, np.inf),
    ...     starts=np.array([0, 2], dtype=np.int32), index=np.array([0, 1], dtype=np.int32),
    ...     value=np.ones(2), integrality=np.ones(2, dtype=np.int32),
    ... )
    >>> outcome = run(model, {"output_flag": False})
    >>> outcome.status, float(outcome.x.sum())
    ('kOptimal', 1.0)

Processes come from a forkserver: the server has gRPC threads, so forking it is
unsafe; the forkserver is a clean single-threaded process, started once (on the first
child solve) with NumPy, highspy and this module imported, which forks each child. No
model data is pickled: the model and the reply cross the pipe as bytes framed here
(`pack`, `unpack`: a JSON header and NumPy arrays saved without pickles).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from multiprocessing import spawn
from multiprocessing.connection import Connection, wait

import highspy
import numpy as np

from ...errors import RematError, ResourceExhausted


def _quiet_first_highs() -> None:
    """HiGHS prints its banner on stdout when a process makes its first Highs object,
    before any option can turn output off: make that one here, at import (the server
    starts serving later), with stdout pointed at /dev/null for the moment."""
    if sys.stdout is not None:
        sys.stdout.flush()  # what Python holds goes out first, not into /dev/null
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to keep clean
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_quiet_first_highs()


@dataclass(frozen=True)
class Model:
    """A MILP in HiGHS's row-wise form: minimise cost @ x such that lb <= x <= ub and
    lower <= A x <= upper, A in CSR (starts, index, value); integrality 1: integer."""

    cost: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    starts: np.ndarray
    index: np.ndarray
    value: np.ndarray
    integrality: np.ndarray
    # A known solution's values for some columns (a warm start: HiGHS completes the
    # rest, and keeps it as its first incumbent if feasible, else ignores it).
    start_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    start_value: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass(frozen=True)
class Outcome:
    """What a run left. `status` is a HighsModelStatus name; a run this module stopped
    reads kInterrupt (the caller stopped it) or kTimeLimit (the wall limit passed)."""

    status: str
    x: np.ndarray | None  # the best solution's column values, if one was found
    gap: float  # relative MIP gap (inf without a solution)
    bound: float  # proven lower bound on the objective (-inf without one)
    message: str


def run(
    model: Model, options: Mapping[str, object], interrupt: Callable[[], bool] | None = None
) -> Outcome:
    """Solve in this process; HiGHS stops where it polls once `interrupt()` is true."""
    h = highspy.Highs()
    for option, value in {**options, "threads": THREADS}.items():
        h.setOptionValue(option, value)
    h.passModel(
        len(model.cost),
        len(model.lower),
        len(model.value),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMinimize),
        0.0,
        model.cost,
        model.lb,
        model.ub,
        model.lower,
        model.upper,
        model.starts,
        model.index,
        model.value,
        model.integrality,
    )
    if len(model.start_index):
        h.setSolution(len(model.start_index), model.start_index, model.start_value)
    if interrupt is not None:

        def callback(_kind, _message, _out, data_in, _data) -> None:
            if interrupt():
                data_in.user_interrupt = True

        # The low-level callback API (highspy 1.7 on). A top-level LP solve (a model
        # presolve left without integers) polls the simplex or IPM interrupt.
        h.setCallback(callback, None)
        for kind in _INTERRUPTS:
            h.startCallback(kind)
    h.run()
    status, info = h.getModelStatus(), h.getInfo()
    found = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
    return Outcome(
        status.name,
        np.array(h.getSolution().col_value) if found else None,
        float(info.mip_gap),
        float(info.mip_dual_bound),
        h.modelStatusToString(status),
    )


_INTERRUPTS = (
    highspy.cb.HighsCallbackType.kCallbackSimplexInterrupt,
    highspy.cb.HighsCallbackType.kCallbackIpmInterrupt,
    highspy.cb.HighsCallbackType.kCallbackMipInterrupt,
)


def run_in_child(
    model: Model,
    options: Mapping[str, object],
    stopped: Callable[[], bool],
    wall: float,
    name: str = "",
) -> Outcome:
    """Solve in a child process. Once `stopped()` is true, or `wall` seconds after the
    child started, kill it and return kInterrupt or kTimeLimit, without a solution: a
    killed child leaves no incumbent. A child that dies on its own raises
    ResourceExhausted (SIGKILL: most likely the kernel's OOM killer) or RematError."""
    context = _context()
    ours, theirs = context.Pipe()
    child = context.Process(target=_child, args=(theirs,), name=CHILD_NAME, daemon=True)
    try:
        with _LOCK:  # start and join read every child's exit status: one thread at a time
            child.start()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    # Sent from a thread: a child that never read its model would block the send, and
    # the request's end must still be heard. It fails (EPIPE) once the child is gone.
    message = pack({"options": dict(options)}, _arrays(model))
    sender = threading.Thread(target=_send, args=(ours, message), daemon=True)
    sender.start()
    give_up, died = time.monotonic() + wall, False
    try:
        while True:
            ready = wait([ours, child.sentinel], _POLL_SECONDS)
            if ours in ready:
                try:
                    return _outcome(ours.recv_bytes())
                except (EOFError, OSError):  # closed without a reply
                    died = True
                    break
            if ready:
                died = True
                break
            if stopped():
                return Outcome(
                    "kInterrupt", None, np.inf, -np.inf, "stopped: the solver was killed"
                )
            if time.monotonic() >= give_up:
                why = "time limit reached: the solver was killed"
                return Outcome("kTimeLimit", None, np.inf, -np.inf, why)
    finally:
        code = _end(child, died)
        sender.join(5.0)
        if not sender.is_alive():  # else leak it: never write to a recycled descriptor
            ours.close()
    raise _died(code, name)


def _send(conn: Connection, message: bytes) -> None:
    try:
        conn.send_bytes(message)
    except OSError:  # the child is gone: the parent's loop reports why
        pass


# HiGHS's thread pool is process-wide and sized by the first run in a process: a later
# run asking for another size fails before it starts (model status "Not Set"). So every
# run here asks for this one (a doctest that left the default once made every MILP
# solve after it in the process fail).
THREADS = 1
# Where there is no forkserver (Windows), callers solve in process.
AVAILABLE = "forkserver" in multiprocessing.get_all_start_methods()
CHILD_NAME = "remat-highs"
_POLL_SECONDS = 0.05
# Imported once by the forkserver, so that each child has them: this module brings
# the planners package along (a child would import it to find its target otherwise).
PRELOAD = ["numpy", "highspy", "scipy.sparse", __name__]
_LOCK = threading.Lock()
_forkserver: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _forkserver
    with _LOCK:
        if _forkserver is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _forkserver = context
        return _forkserver


def _preparation_data(name: str, get: Callable[[str], dict] = spawn.get_preparation_data):
    """`spawn.get_preparation_data` (what a child sets up before it unpickles its
    target), except that this module's children do not run the parent's __main__ again:
    their target is here, and that script may be `remat serve` importing the CLI each
    time (~0.1 s), or an unguarded one that would plan again. The forkserver would
    preload __main__ once but cannot before Python 3.14 (CPython issues 98552, 126631)."""
    data = get(name)
    if name == CHILD_NAME:
        for key in ("init_main_from_name", "init_main_from_path"):
            data.pop(key, None)
    return data


if getattr(spawn.get_preparation_data, "__module__", None) != __name__:  # once, if reloaded
    spawn.get_preparation_data = _preparation_data


def _end(child: multiprocessing.process.BaseProcess, died: bool) -> int | None:
    """Kill the child if it still runs (after its reply it has nothing left to do) and
    return its exit code (None if unknown). One that died is given a moment to be
    reaped first, so that its own exit code is the one reported."""
    with _LOCK:
        if died:
            child.join(5.0)
        if child.exitcode is None:
            child.kill()
            child.join(5.0)
        code = child.exitcode
        if code is not None:
            child.close()
        return code


def _died(code: int | None, name: str) -> RematError:
    who = f"the MILP solver's process (policy {name})" if name else "the MILP solver's process"
    if code == -signal.SIGKILL:
        return ResourceExhausted(f"{who} was killed (SIGKILL), most likely out of memory")
    if code is not None and code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = str(-code)
        return RematError(f"{who} died of signal {what}")
    if code is None:
        return RematError(f"{who} stopped answering and could not be reaped")
    return RematError(f"{who} exited with code {code} before replying")


def _child(conn: Connection) -> None:
    """The child: read the model, solve, reply; exit at once if the parent goes."""
    try:
        header, arrays = unpack(conn.recv_bytes())
    except EOFError:
        return
    _quiet_banner()
    # The parent never writes again: the pipe becomes readable only when it closes
    # (the parent died, or gave up on this solve). HiGHS releases the GIL while it runs.
    threading.Thread(target=_orphaned, args=(conn,), daemon=True).start()
    outcome = run(Model(**arrays), header["options"])
    reply = {"status": outcome.status, "gap": outcome.gap, "bound": outcome.bound}
    reply["message"] = outcome.message
    conn.send_bytes(pack(reply, {} if outcome.x is None else {"x": outcome.x}))


def _quiet_banner() -> None:
    """HiGHS prints its banner to stdout on a process's first Highs(): the server has
    shown it once, its children need not each add a copy to its log. A child has one
    thread here, so it may point its stdout elsewhere for a moment."""
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _orphaned(conn: Connection) -> None:
    try:
        conn.poll(None)
    finally:
        os._exit(0)


def _arrays(model: Model) -> dict[str, np.ndarray]:
    return {f.name: getattr(model, f.name) for f in fields(model)}


def _outcome(data: bytes) -> Outcome:
    header, arrays = unpack(data)
    gap, bound = float(header["gap"]), float(header["bound"])
    return Outcome(header["status"], arrays.get("x"), gap, bound, header["message"])


# --- framing ---------------------------------------------------------------------------
# A message is: the header's length (4 bytes, big-endian), the JSON header (its "arrays"
# lists the arrays' names in order), then each array in NumPy's .npy format.


def pack(header: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> bytes:
    """One message of a JSON-able header and named arrays (no object arrays).

    >>> header, arrays = unpack(pack({"status": "kOptimal"}, {"x": np.arange(3.0)}))
    >>> header["status"], arrays["x"].tolist()
    ('kOptimal', [0.0, 1.0, 2.0])
    """
    text = json.dumps({**header, "arrays": list(arrays)}).encode()
    buffer = io.BytesIO()
    buffer.write(struct.pack(">I", len(text)))
    buffer.write(text)
    for array in arrays.values():
        np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """A `pack`ed message's header and arrays (arrays never unpickled)."""
    (length,) = struct.unpack_from(">I", data)
    header = json.loads(data[4 : 4 + length])
    buffer = io.BytesIO(data)
    buffer.seek(4 + length)
    arrays = {name: np.load(buffer, allow_pickle=False) for name in header.pop("arrays")}
    return header, arrays
