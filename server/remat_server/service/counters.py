"""An unlabelled Prometheus counter and gauge for a single-process server, cheaper to
update than prometheus_client's: the compile cache counts a hit, and every RPC counts
itself in and out of the ones in flight, on every request, where prometheus_client's
`inc` is three Python calls and a lock. Here it is the lock. Exposed like
prometheus_client's (no `_created`); only for a single-process server (see
`histogram.LocalHistogram`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _LocalValue:
    """One number under a lock, registered as a collector of `_family`."""

    _family: type

    def __init__(self, name: str, doc: str, registry: CollectorRegistry):
        self._name, self._doc = name, doc
        self._value = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def describe(self) -> list:
        return [self._family(self._name, self._doc)]

    def collect(self) -> Iterator:
        yield self._family(self._name, self._doc, value=self._value)


class LocalCounter(_LocalValue):
    """
    >>> registry = CollectorRegistry()
    >>> hits = LocalCounter("hits_total", "Hits.", registry)
    >>> hits.inc()
    >>> registry.get_sample_value("hits_total")
    1.0
    """

    _family = CounterMetricFamily

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            self._value += amount


class LocalGauge(_LocalValue):
    """
    >>> registry = CollectorRegistry()
    >>> inflight = LocalGauge("inflight", "In flight.", registry)
    >>> inflight.inc(); inflight.inc(); inflight.dec()
    >>> registry.get_sample_value("inflight")
    1.0
    """

    _family = GaugeMetricFamily

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self._value -= amount
