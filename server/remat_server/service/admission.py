"""Admission control: FIFO limits on what requests use at once.

`MemoryAdmission`: one byte budget shared by all running requests. Before a request
runs, its predicted peak bytes are reserved. A request that does not
fit waits in a bounded FIFO queue (until its deadline, or until it is cancelled) or is
rejected. The queue is strict FIFO: only its head may be admitted, so a big request is
never starved by small ones that arrive behind it. `FifoLimiter`, its base, also
counts handler threads doing work and exact solves planning at once.

>>> admission = MemoryAdmission(budget_bytes=100, max_queued=4)
>>> with admission.reserve(60, timeout=1.0) as granted:
...     print(granted.queue_seconds, admission.in_use)
0.0 60
>>> admission.in_use
0
>>> try:
...     with admission.reserve(200, timeout=1.0):
...         pass
... except ResourceExhausted as error:
...     print("--memory-budget-bytes" in str(error))
True
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import Cancelled, DeadlineExceeded, ResourceExhausted

_POLL_SECONDS = 0.05  # how often a waiter re-checks `cancelled()`


@dataclass(frozen=True)
class Admission:
    """A granted reservation; `queue_seconds` is how long it waited (0.0 if not at all)."""

    queue_seconds: float = 0.0


class FifoLimiter:
    """At most `capacity` units in use at once (<= 0: unlimited), granted in FIFO order;
    at most `max_queued` requests wait. `unit` names what is counted in messages, and
    `flag` and `queue_flag` the server flags that raise the two limits."""

    def __init__(
        self,
        capacity: int,
        max_queued: int,
        unit: str,
        flag: str,
        queue_flag: str = "--max-queued-requests",
    ) -> None:
        self._budget = int(capacity)
        self._max_queued = max(0, int(max_queued))
        self._unit, self._flags, self._queue_flag = unit, flag, queue_flag
        # Fast paths take the lock itself (`with self._lock`, in C); waiting uses the
        # condition built on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._in_use = 0
        self._peak = 0  # high-water mark of in_use: never above the capacity
        self._queue: deque[object] = deque()  # waiting tickets, head first

    @property
    def capacity(self) -> int:
        return self._budget

    @property
    def metered(self) -> bool:
        """Whether requests are held to a limit (else they run at once, unrecorded)."""
        return self._budget > 0

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    @property
    def peak_in_use(self) -> int:
        with self._lock:
            return self._peak

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    @contextlib.contextmanager
    def reserve(
        self,
        amount: int = 1,
        *,
        timeout: float | None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Admission]:
        """Wait until `amount` fits (FIFO), yield an Admission, release on exit."""
        amount = int(amount)
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount})")
        waited = self.acquire(amount, timeout, cancelled)
        try:
            yield Admission(queue_seconds=waited)
        finally:
            self.release(amount)

    def _too_big(self, amount: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the request needs {amount} {self._unit}, more than the server's {self._budget}; "
            f"start the server with a larger {self._flags}"
        )

    def _fits(self, amount: int) -> bool:
        return self._budget <= 0 or self._in_use + amount <= self._budget

    def _take(self, amount: int) -> None:
        self._in_use += amount
        self._peak = max(self._peak, self._in_use)
        assert self._budget <= 0 or self._in_use <= self._budget, (self._in_use, self._budget)

    def release(self, amount: int) -> None:
        """Give back what `acquire` took (`reserve` does both)."""
        with self._lock:
            self._in_use -= amount
            assert self._in_use >= 0, self._in_use
            if self._queue:  # every waiter is in the queue
                self._cond.notify_all()

    def try_acquire(self, amount: int) -> bool:
        """Take `amount` if it fits now with nobody queued ahead (never waits)."""
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount})")
        if 0 < self._budget < amount:
            raise self._too_big(amount)
        with self._lock:
            if not self._queue and self._fits(amount):
                self._take(amount)
                return True
        return False

    def acquire(self, amount: int, timeout: float | None, cancelled: Callable[[], bool]) -> float:
        """Wait (FIFO) until `amount` fits and take it; returns the seconds waited."""
        if 0 < self._budget < amount:
            raise self._too_big(amount)
        with self._lock:  # `self._cond`'s lock, taken in C: the path without a wait
            if not self._queue and self._fits(amount):
                self._take(amount)
                return 0.0
            if len(self._queue) >= self._max_queued:
                raise ResourceExhausted(
                    f"server is busy: {len(self._queue)} request(s) already waiting for "
                    f"{self._unit} ({self._in_use} of {self._budget} in use, {amount} needed); "
                    f"retry later, or start the server with a larger {self._queue_flag} "
                    f"or {self._flags}"
                )
            ticket = object()
            self._queue.append(ticket)
            start = time.monotonic()
            deadline = None if timeout is None else start + timeout
            try:
                while not (self._queue[0] is ticket and self._fits(amount)):
                    now = time.monotonic()
                    if cancelled():
                        raise Cancelled(
                            f"request cancelled after waiting {now - start:.3f} s "
                            f"for {amount} {self._unit}"
                        )
                    if deadline is not None and now >= deadline:
                        raise DeadlineExceeded(
                            f"waited {now - start:.3f} s for {amount} {self._unit} "
                            f"({self._in_use} of {self._budget} in use) and hit the deadline"
                        )
                    pause = (
                        _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - now)
                    )
                    self._cond.wait(pause)
                self._take(amount)
                return time.monotonic() - start
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # a new head (or the next fit) may now proceed


class MemoryAdmission(FifoLimiter):
    """Reserve predicted peak bytes under `budget_bytes` (<= 0: unlimited)."""

    def __init__(self, budget_bytes: int, max_queued: int) -> None:
        super().__init__(budget_bytes, max_queued, "bytes of memory", "--memory-budget-bytes")

    @property
    def budget_bytes(self) -> int:
        return self.capacity

    def _too_big(self, amount: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the request's predicted peak memory is {amount} bytes, more than the server's "
            f"memory budget of {self._budget} bytes; choose a checkpoint policy that stores "
            f"less, or start the server with a larger --memory-budget-bytes"
        )
