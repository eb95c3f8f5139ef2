"""Retries: which RPC failures a call tries again, how long it waits between tries
(exponential backoff with full jitter, all within the call's one deadline), and which
replica a sharded call's next try goes to. The drivers (`remat.Client`,
`remat.AsyncClient`) use them around every RPC a flow (`remat.calls`) yields."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from .errors import from_rpc_error


@dataclass(frozen=True)
class Retry:
    """Retry UNAVAILABLE with exponential backoff and full jitter.

    `attempts` counts the first try; delays grow from `initial_backoff` by
    `multiplier` up to `max_backoff`; never past the call's deadline.

        >>> list(Retry(attempts=1).delays())
        []
        >>> len(list(Retry(attempts=4).delays()))
        3
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(ceiling * self.multiplier, self.max_backoff)


DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (time.monotonic()), at least 0; None: no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


@dataclass
class Placement:
    """Where a call's RPCs go: replica `replica` of the `count` whose addresses the
    client knows (see `remat.targets`). A call retried after UNAVAILABLE (its replica
    died, or is going) moves on to the next replica, and its later RPCs follow it.

        >>> placed = Placement(replica=2, count=3)
        >>> placed.move_on()
        >>> placed.replica
        0
    """

    replica: int
    count: int

    def move_on(self) -> None:
        self.replica = (self.replica + 1) % self.count


class Attempts:
    """The retry schedule of one RPC within a call's deadline. A driver tries,
    and after a failure waits `delay_after(error)` (which raises the remat exception
    when the error is final, and moves `placement`, if any, on to the next replica
    otherwise) before trying again:

        attempts = Attempts(retry, deadline, placement)
        while True:
            try:
                return rpc(placement, timeout=attempts.left())
            except grpc.RpcError as error:
                sleep(attempts.delay_after(error))
    """

    def __init__(self, retry: Retry, deadline: float | None, placement: Placement | None = None):
        self.deadline = deadline
        self.placement = placement
        self._retry = retry
        self._delays: Iterator[float] | None = None  # made at the first failure

    def left(self) -> float | None:
        return time_left(self.deadline)

    def delay_after(self, error: grpc.RpcError) -> float:
        retryable = getattr(error, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE
        if retryable and self._delays is None:
            self._delays = self._retry.delays()
        delay = next(self._delays, None) if retryable else None
        if delay is None or (
            self.deadline is not None and time.monotonic() + delay >= self.deadline
        ):
            raise from_rpc_error(error) from None
        if self.placement is not None:
            self.placement.move_on()
        return delay
