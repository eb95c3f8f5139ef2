"""Measure a run's real peak allocation with tracemalloc (NumPy reports its buffers
to it). Tracing is process-wide, so measured runs take a lock and go one at a time."""

from __future__ import annotations

import contextlib
import threading
import tracemalloc
from dataclasses import dataclass

_LOCK = threading.Lock()


@dataclass
class Measured:
    peak: int = 0  # bytes allocated at the peak, above what was allocated at the start


@contextlib.contextmanager
def peak_memory(enabled: bool):
    """`with peak_memory(True) as m: ...` leaves the traced peak in `m.peak`."""
    measured = Measured()
    if not enabled:
        yield measured
        return
    with _LOCK:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            yield measured
            measured.peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
