"""The acceptance floor: a plain run of tests/property generates at least 10,000 cases
(the terminal summary prints how many were actually run)."""

from __future__ import annotations

from fuzz_support import EXAMPLES
from test_fuzz_bytes import RPCS

# How many times each kind of test is parametrized.
RUNS = {"raw_bytes": len(RPCS), "mutated_bytes": len(RPCS), "hostile_graphs": 2}


def test_at_least_ten_thousand_cases_are_configured():
    total = sum(count * RUNS.get(kind, 1) for kind, count in EXAMPLES.items())
    assert total >= 10_000, total
