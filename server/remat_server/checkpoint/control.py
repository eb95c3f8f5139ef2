"""Planning on a request's behalf: its deadline, its cancellation, and the server's
limit on expensive solves at once.

An exact MILP solve may run for a minute and a Budget search simulates dozens of
schedules; once the request that asked has ended (cancelled, or past its deadline)
that work only keeps a CPU busy. The engine knows the request and the planners know
where the time goes, so the engine sets a `PlanControl` for the block that plans
(`controlled`) and the planners ask the current one, through a ContextVar rather than
an argument threaded through every planner. Without a control (offline use, tests)
nothing changes: no deadline, never cancelled, no slot to wait for.

    >>> import time
    >>> from remat_server.errors import DeadlineExceeded
    >>> seconds_left(60.0), stopped()  # no control
    (60.0, False)
    >>> late = PlanControl(deadline=time.monotonic() - 1.0)
    >>> with controlled(late):
    ...     seconds_left(60.0), stopped()
    (0.0, True)
    >>> with controlled(late):
    ...     try:
    ...         check("optimal(0.5)")
    ...     except DeadlineExceeded as e:
    ...         print(e)
    the request's deadline passed while planning (policy optimal(0.5))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import Cancelled, DeadlineExceeded


def _never() -> bool:
    return False


@dataclass(frozen=True)
class PlanControl:
    """What the engine tells the planners about the request they plan for."""

    deadline: float | None = None  # time.monotonic() seconds; None: no deadline
    cancelled: Callable[[], bool] = _never  # True once the request has ended
    # A solve slot (e.g. a semaphore's context manager); None: unlimited.
    exclusive: Callable[[], AbstractContextManager] | None = None
    # Entered while the request only waits (for another request's plan): the server
    # lends the request's work slot out meanwhile. None: nothing to lend.
    idle: Callable[[], AbstractContextManager] | None = None


_current: ContextVar[PlanControl | None] = ContextVar("plan_control", default=None)
# True inside expensive(): a nested one (Optimal's fallback runs Budget's search) must
# not wait for a second slot, which could deadlock against a full limiter.
_holding: ContextVar[bool] = ContextVar("plan_slot_held", default=False)


@contextmanager
def controlled(control: PlanControl) -> Iterator[None]:
    """Plan under `control` for the duration of the block."""
    token = _current.set(control)
    try:
        yield
    finally:
        _current.reset(token)


def stopped() -> bool:
    """True once the current request has ended. Cheap: solver callbacks call it often."""
    control = _current.get()
    if control is None:
        return False
    return control.cancelled() or (
        control.deadline is not None and time.monotonic() >= control.deadline
    )


def check(policy: str = "") -> None:
    """Raise Cancelled or DeadlineExceeded when the current request has ended, naming
    `policy` (the planner's label) when given; else return."""
    control = _current.get()
    if control is None:
        return
    where = f" (policy {policy})" if policy else ""
    if control.cancelled():
        raise Cancelled(f"the request was cancelled while planning{where}")
    if control.deadline is not None and time.monotonic() >= control.deadline:
        raise DeadlineExceeded(f"the request's deadline passed while planning{where}")


def seconds_left(limit: float) -> float:
    """A solver's time limit: `limit` seconds, or less when the deadline is sooner;
    never negative."""
    control = _current.get()
    if control is None or control.deadline is None:
        return max(0.0, limit)
    return max(0.0, min(limit, control.deadline - time.monotonic()))


@contextmanager
def waiting() -> Iterator[None]:
    """A block in which the current request only waits (see `PlanControl.idle`)."""
    control = _current.get()
    if control is None or control.idle is None:
        yield
        return
    with control.idle():
        yield


@contextmanager
def expensive(policy: str = "") -> Iterator[None]:
    """Hold one of the server's solve slots for the block (waiting for it if need be),
    then check the request is still alive. Re-entrant: inside another expensive()
    block, or without a limiter, it takes nothing."""
    control = _current.get()
    if control is None or control.exclusive is None or _holding.get():
        check(policy)
        yield
        return
    with control.exclusive():
        token = _holding.set(True)
        try:
            check(policy)  # the request may have ended while it waited
            yield
        finally:
            _holding.reset(token)
