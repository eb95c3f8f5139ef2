"""The engine's NaN/Inf warning (a one-pass check that must still be exact) and the
allocator tuning the server applies at start."""

from __future__ import annotations

import ctypes.util
import warnings

import numpy as np
import pytest

from remat_server.engine.checks import nonfinite_warnings
from remat_server.runtime import allocator

BIG = np.finfo(np.float32).max


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 2.0], []),
        ([BIG, BIG, BIG], []),  # the sum overflows to inf, yet every value is finite
        ([np.nan, 1.0, np.inf], ["output 'y' has 2 NaN or Inf values"]),
        ([-np.inf], ["output 'y' has 1 NaN or Inf values"]),
        ([], []),
    ],
)
@pytest.mark.parametrize("repeat", [1, 5000])  # small arrays (isfinite) and big ones (a sum)
def test_nonfinite_counts_exactly(values, expected, repeat):
    array = np.tile(np.array(values, np.float32), repeat)
    expected = [w.replace(" 2 ", f" {2 * repeat} ").replace(" 1 ", f" {repeat} ") for w in expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflowing sum must not warn either
        assert list(nonfinite_warnings(output={"y": array})) == expected


def test_integer_tensors_are_not_checked():
    assert nonfinite_warnings(input={"n": np.array([2**62, 2**62], np.int64)}) == ()


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no C library")
def test_tune_for_serving_sets_the_thresholds_where_glibc_is():
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt  # noqa: B018 (exists on glibc)
    except AttributeError:
        pytest.skip("not glibc")
    assert allocator.tune_for_serving() is True
    assert allocator.tune_for_serving(32 << 20, 64 << 20) is True  # the fast setting
    assert allocator.tune_for_serving(arena_max=0) is True  # glibc's own arena count
    assert allocator.tune_for_serving() is True  # back to the default for other tests


@pytest.mark.parametrize(
    "mmap_bytes, trim_bytes, arenas", [(0, 1, 1), ((32 << 20) + 1, 1, 1), (1, -1, 1), (1, 1, -1)]
)
def test_tune_for_serving_refuses_settings_glibc_would_not_take(mmap_bytes, trim_bytes, arenas):
    with pytest.raises(ValueError, match="malloc settings"):
        allocator.tune_for_serving(mmap_bytes, trim_bytes, arenas)


def test_the_trimmer_keeps_memory_for_a_like_request_and_trims_for_a_smaller_one():
    trims = []
    trimmer = allocator.Trimmer(idle_seconds=0, trim=lambda: trims.append(trimmer.kept))
    mib = 1 << 20
    # A loop of like requests reuses what the first left; a much smaller one trims first
    # (its RSS follows its own plan); a bigger one only raises what is kept.
    assert [trimmer.before(n * mib) for n in (100, 100, 95, 50, 60, 200)] == [
        False,
        False,
        False,
        True,
        False,
        False,
    ]
    assert trims == [50 * mib] and trimmer.kept == 200 * mib
    # Tiny amounts are never worth a trim.
    small = allocator.Trimmer(idle_seconds=0, trim=lambda: trims.append("small"))
    assert not small.before(allocator.TRIM_AFTER_BYTES // 2) and not small.before(1)


def test_the_trimmer_trims_when_idle_and_not_while_busy():
    trims = []
    trimmer = allocator.Trimmer(
        idle_seconds=0, trim=lambda: trims.append(1), on_idle=lambda: trims.append("idle")
    )
    trimmer.before(64 << 20)
    assert not trimmer.trim_if_idle(seconds=3600)  # a request started just now
    # Idle: the hook (a pool's shrink) first, so that the trim returns what it freed.
    assert trimmer.trim_if_idle(seconds=0) and trims == ["idle", 1] and trimmer.kept == 0
    assert not trimmer.trim_if_idle(seconds=0)  # no request since: nothing to do
    trimmer.before(1)  # even a small request may leave memory (others ran beside it)
    assert trimmer.trim_if_idle(seconds=0) and trims == ["idle", 1, "idle", 1]
    # A trim before a smaller request is not an idle moment: no hook.
    trimmer.before(64 << 20)
    assert trimmer.before(1 << 20) and trims[-1] == 1
