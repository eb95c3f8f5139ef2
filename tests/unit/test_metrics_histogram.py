"""The single-process server's histograms (`histogram.LocalHistogram`), counters and
gauges (`counters.LocalCounter`, `LocalGauge`) expose what prometheus_client's
`Histogram`, `Counter` and `Gauge` expose for the same observations (but `_created`)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from remat_server.service.counters import LocalCounter, LocalGauge
from remat_server.service.histogram import LocalHistogram
from remat_server.service.metrics import BYTES_BUCKETS, SECONDS_BUCKETS

rng = random.Random(0)
CASES = {
    "seconds": (
        SECONDS_BUCKETS,
        [0.0, 0.0005, 0.001, 60.0, 61.0, -1.0, float("inf")]
        + [rng.random() * 10 for _ in range(200)],
    ),
    "bytes": (
        BYTES_BUCKETS,
        [0.0, 1024.0, 1025.0, 2.0**40, 2.0**50] + [rng.random() * 2**30 for _ in range(200)],
    ),
}


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@pytest.mark.parametrize("case", CASES)
def test_same_exposition_as_prometheus_client(case):
    buckets, values = CASES[case]
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x", "X.", ["method", "code"], buckets=buckets, registry=theirs)
    fast = LocalHistogram("x", "X.", ["method", "code"], buckets, ours)
    for i, v in enumerate(values):
        labels = ("Run", "OK") if i % 3 else ("Plan", "INVALID_ARGUMENT")
        reference.labels(*labels).observe(v)
        fast.labels(*labels).observe(v)
    assert exposition(ours) == exposition(theirs)


def test_refuses_the_wrong_number_of_labels():
    fast = LocalHistogram("y", "Y.", ["policy"], SECONDS_BUCKETS, CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        fast.labels("a", "b")


def test_local_counter_exposition_as_prometheus_client():
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("hits_total", "Hits.", registry=theirs)
    fast = LocalCounter("hits_total", "Hits.", ours)
    for amount in (1, 1, 2.5, 0):
        reference.inc(amount)
        fast.inc(amount)
    assert exposition(ours) == exposition(theirs)
    with pytest.raises(ValueError):
        fast.inc(-1)


def test_local_gauge_exposition_as_prometheus_client():
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Gauge("inflight", "In flight.", registry=theirs)
    fast = LocalGauge("inflight", "In flight.", ours)
    for gauge in (reference, fast):
        gauge.inc()
        gauge.inc(2)
        gauge.dec()
    assert exposition(ours) == exposition(theirs)
