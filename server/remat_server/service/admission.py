"""Memory-aware admission control: one byte budget shared by all running requests.

Before a request runs, its predicted peak bytes are reserved. A request that does not
fit waits in a bounded FIFO queue (until its deadline, or until it is cancelled) or is
rejected. The queue is strict FIFO: only its head may be admitted, so a big request is
never starved by small ones that arrive behind it.

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


class MemoryAdmission:
    """Reserve predicted peak bytes under `budget_bytes` (<= 0: unlimited)."""

    def __init__(self, budget_bytes: int, max_queued: int) -> None:
        self._budget = int(budget_bytes)
        self._max_queued = max(0, int(max_queued))
        self._cond = threading.Condition()
        self._in_use = 0
        self._peak = 0  # high-water mark of in_use: never above the budget
        self._queue: deque[object] = deque()  # waiting tickets, head first

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def metered(self) -> bool:
        """Whether requests are held to a budget (else they run at once, unrecorded)."""
        return self._budget > 0

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    @property
    def peak_in_use(self) -> int:
        with self._cond:
            return self._peak

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextlib.contextmanager
    def reserve(
        self,
        nbytes: int,
        *,
        timeout: float | None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Admission]:
        """Wait until `nbytes` fit (FIFO), yield an Admission, release on exit."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({nbytes})")
        waited = self._acquire(nbytes, timeout, cancelled)
        try:
            yield Admission(queue_seconds=waited)
        finally:
            self._release(nbytes)

    def _fits(self, nbytes: int) -> bool:
        return self._budget <= 0 or self._in_use + nbytes <= self._budget

    def _take(self, nbytes: int) -> None:
        self._in_use += nbytes
        self._peak = max(self._peak, self._in_use)
        assert self._budget <= 0 or self._in_use <= self._budget, (self._in_use, self._budget)

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._in_use -= nbytes
            assert self._in_use >= 0, self._in_use
            self._cond.notify_all()

    def _acquire(self, nbytes: int, timeout: float | None, cancelled: Callable[[], bool]) -> float:
        if 0 < self._budget < nbytes:
            raise ResourceExhausted(
                f"the request's predicted peak memory is {nbytes} bytes, more than the server's "
                f"memory budget of {self._budget} bytes; choose a checkpoint policy that stores "
                f"less, or start the server with a larger --memory-budget-bytes"
            )
        with self._cond:
            if not self._queue and self._fits(nbytes):
                self._take(nbytes)
                return 0.0
            if len(self._queue) >= self._max_queued:
                raise ResourceExhausted(
                    f"server is busy: {len(self._queue)} request(s) already waiting for memory "
                    f"({self._in_use} of {self._budget} bytes in use, {nbytes} needed); retry "
                    f"later, or start the server with a larger --max-queued-requests"
                )
            ticket = object()
            self._queue.append(ticket)
            start = time.monotonic()
            deadline = None if timeout is None else start + timeout
            try:
                while not (self._queue[0] is ticket and self._fits(nbytes)):
                    now = time.monotonic()
                    if cancelled():
                        raise Cancelled(
                            f"request cancelled after waiting {now - start:.3f} s "
                            f"for {nbytes} bytes of memory"
                        )
                    if deadline is not None and now >= deadline:
                        raise DeadlineExceeded(
                            f"waited {now - start:.3f} s for {nbytes} bytes of memory "
                            f"({self._in_use} of {self._budget} bytes in use) and hit the deadline"
                        )
                    pause = (
                        _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - now)
                    )
                    self._cond.wait(pause)
                self._take(nbytes)
                return time.monotonic() - start
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # a new head (or the next fit) may now proceed
