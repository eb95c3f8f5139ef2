"""Planning under its request's control (`checkpoint.control`): a deadline or a
cancellation stops the exact MILP and Budget's search with DEADLINE_EXCEEDED or
CANCELLED (never a fallback plan nobody waits for), and a request holds at most one
solve slot, however the planners nest (Optimal falls back to Budget's search).

The long solves are tanh chains at 0.4 or 0.5 of store_all's peak, presolved in
milliseconds, whose branch and bound HiGHS needs seconds to minutes to close: 16 layers
(2,647 variables) is solved in a child process that the stop kills, 10 layers (1,156)
in this process, stopped by the interrupt callback (test_highs_process has the models
whose presolve alone takes seconds). Timing bounds are loose on purpose: the tests run
on loaded 2-core machines.
"""

from __future__ import annotations

import functools
import multiprocessing
import threading
import time
from contextlib import contextmanager

import pytest
import support

from remat_proto.policies import DTR, Auto, Budget, Optimal
from remat_server.checkpoint import control
from remat_server.checkpoint.control import PlanControl, controlled
from remat_server.checkpoint.planners import highs_process, milp, milp_order, plan
from remat_server.checkpoint.planners.bounds import store_all_peak
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.errors import Cancelled, DeadlineExceeded

ENGINE = Engine()
TIME_LIMIT = 60.0


@functools.cache
def _planned(length: int, width: int):
    spec = support.tanh_chain(length, width, "float64", loss=True)
    return ENGINE.plan(spec, wrt=("x",), loss="loss")


def chain(length: int, width: int = 4) -> Problem:
    """A fresh problem (planners may cache on it) for a tanh chain's joint graph."""
    planned = _planned(length, width)
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


class Slot:
    """An `exclusive` that counts its entries and refuses a second one at once: a
    request waiting for a second slot while holding one could deadlock the server."""

    def __init__(self):
        self.entries = 0
        self.held = False

    @contextmanager
    def __call__(self):
        assert not self.held, "the request asked for a second solve slot"
        self.held, self.entries = True, self.entries + 1
        try:
            yield
        finally:
            self.held = False


def cancel_after(seconds: float) -> tuple[threading.Event, threading.Timer]:
    flag = threading.Event()
    timer = threading.Timer(seconds, flag.set)
    timer.start()
    return flag, timer


# --- the control itself ----------------------------------------------------------------


def test_without_a_control_planning_never_stops():
    control.check()
    assert not control.stopped()
    assert control.seconds_left(5.0) == 5.0
    with control.expensive():
        control.check("budget(0.5)")


def test_a_live_request_is_not_stopped_and_bounds_the_time_left():
    with controlled(PlanControl(deadline=time.monotonic() + 3600)):
        control.check()
        assert not control.stopped()
        assert control.seconds_left(5.0) == 5.0
        assert 3000 < control.seconds_left(1e9) <= 3600
    with controlled(PlanControl(deadline=time.monotonic() + 2.0)):
        assert 0.0 < control.seconds_left(60.0) <= 2.0


def test_a_passed_deadline_raises_deadline_exceeded():
    with controlled(PlanControl(deadline=time.monotonic() - 1.0)):
        assert control.stopped()
        assert control.seconds_left(60.0) == 0.0
        with pytest.raises(DeadlineExceeded) as info:
            control.check("optimal(0.5)")
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert str(info.value) == "the request's deadline passed while planning (policy optimal(0.5))"
    control.check()  # the block is over: no control any more


def test_a_cancelled_request_raises_cancelled():
    ended = PlanControl(deadline=time.monotonic() - 1.0, cancelled=lambda: True)
    with controlled(ended):
        assert control.stopped()
        with pytest.raises(Cancelled, match="cancelled while planning") as info:
            control.check()
    assert info.value.code == "CANCELLED"


def test_expensive_takes_one_slot_per_request_however_nested():
    slot = Slot()
    with controlled(PlanControl(exclusive=slot)):
        with control.expensive():
            with control.expensive():  # Optimal's fallback inside Optimal's solve
                assert slot.held
        assert not slot.held and slot.entries == 1
        with control.expensive():  # one after another: one at a time
            pass
    assert slot.entries == 2


def test_a_request_that_ends_while_waiting_for_a_slot_does_not_plan():
    flag = threading.Event()

    @contextmanager
    def exclusive():
        flag.set()  # the request was cancelled while it waited
        yield

    with controlled(PlanControl(cancelled=flag.is_set, exclusive=exclusive)):
        with pytest.raises(Cancelled):
            with control.expensive("budget(0.5)"):
                pytest.fail("planned for a cancelled request")


# --- the planners under it -------------------------------------------------------------


def test_optimal_and_its_budget_search_take_a_single_slot():
    # Optimal runs Budget's search (the MILP's warm start, and its fallback) inside the
    # slot its own solve takes.
    slot = Slot()
    with controlled(PlanControl(exclusive=slot)):
        schedule = plan(chain(12), Optimal(fraction=0.5, time_limit=0.01))
    assert schedule.report.status in ("optimal", "time_limit", "fallback")
    assert slot.entries == 1


def test_budget_takes_a_slot_only_when_store_all_does_not_fit():
    slot = Slot()
    with controlled(PlanControl(exclusive=slot)):
        assert plan(chain(6, 64), Budget(fraction=1.0)).report.chosen == "store_all"
        assert slot.entries == 0
        schedule = plan(chain(6, 64), Budget(fraction=0.7))  # small: the MILP runs too
        assert schedule.report.status == "feasible"
        assert slot.entries == 1
        problem = chain(6, 64)
        plan(problem, Auto(bytes=int(0.7 * store_all_peak(problem))))
        assert slot.entries == 2


POLICIES = {  # each under store_all's peak, so each has something to plan
    "budget": lambda p: Budget(fraction=0.5),
    "optimal": lambda p: Optimal(fraction=0.5),
    "auto": lambda p: Auto(bytes=store_all_peak(p) // 2),
}


@pytest.mark.parametrize("name", POLICIES)
def test_a_cancelled_request_plans_nothing(name):
    problem = chain(6, 64)
    with controlled(PlanControl(cancelled=lambda: True)):
        with pytest.raises(Cancelled, match=r"cancelled while planning \(policy "):
            plan(problem, POLICIES[name](problem))


def solver_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name == highs_process.CHILD_NAME]


@pytest.mark.parametrize(
    "length,fraction,where",
    [(16, 0.4, "a child process"), (10, 0.5, "this process")],
)
def test_cancelling_interrupts_a_long_milp_solve(length, fraction, where):
    problem = chain(length)
    variables = milp._Milp(problem, milp_order.default(problem), 0).variables
    assert (variables <= milp.IN_PROCESS_MAX_VARIABLES) == (where == "this process")
    flag, timer = cancel_after(0.3)
    start = time.monotonic()
    try:
        with controlled(PlanControl(cancelled=flag.is_set)):
            with pytest.raises(Cancelled, match=rf"policy optimal\({fraction}\)"):
                plan(problem, Optimal(fraction=fraction, time_limit=TIME_LIMIT))
    finally:
        timer.cancel()
    # Uninterrupted, these solves run for many seconds; stopped, in well under one.
    elapsed = time.monotonic() - start
    print(f"{length} layers, solved in {where}: cancelled after {elapsed:.3f} s")
    assert elapsed < 10.0
    assert solver_children() == []


def test_a_close_deadline_raises_instead_of_falling_back():
    problem = chain(16)
    start = time.monotonic()
    with controlled(PlanControl(deadline=start + 0.5)):
        with pytest.raises(DeadlineExceeded, match=r"policy optimal\(0.4\)"):
            plan(problem, Optimal(fraction=0.4, time_limit=TIME_LIMIT))
    assert time.monotonic() - start < 10.0
    assert solver_children() == []


def test_a_long_dtr_replay_stops_too():
    # Thousands of computations: the replay checks every CHECK_EVERY of them.
    problem = chain(1200)
    with controlled(PlanControl(cancelled=lambda: True)):
        with pytest.raises(Cancelled, match=r"policy dtr\("):
            plan(problem, DTR(fraction=0.3))
