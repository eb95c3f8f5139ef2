"""MemoryAdmission: immediate admission and release, rejections (too big, queue full),
waiting and FIFO order, timeouts and cancellation, the budget invariant under many
threads, and the unlimited budget. Threads are ordered with Events and `queued`
counts, never with sleeps; only the timeout tests use short real timeouts."""

from __future__ import annotations

import doctest
import random
import threading
import time

import pytest

from remat_server.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from remat_server.service import admission as admission_module
from remat_server.service.admission import Admission, MemoryAdmission


def wait_until(predicate, timeout: float = 2.0) -> None:
    """Spin until `predicate()` holds (a sync point, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.001)


def in_thread(fn):
    """Run fn() in a daemon thread; the box gets its 'value' or 'error'."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def join(*threads) -> None:
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()


def reserve_and(adm, nbytes, on_enter=lambda: None, **kwargs):
    """fn for in_thread: reserve, call on_enter() inside the block, return the Admission."""

    def fn():
        with adm.reserve(nbytes, timeout=kwargs.pop("timeout", 5.0), **kwargs) as granted:
            on_enter()
            return granted

    return fn


def test_module_example_runs():
    assert doctest.testmod(admission_module).failed == 0


@pytest.mark.parametrize("budget, nbytes", [(100, 0), (100, 1), (100, 100), (0, 10**12), (-1, 5)])
def test_fits_immediately_and_is_released(budget, nbytes):
    adm = MemoryAdmission(budget, max_queued=0)
    with adm.reserve(nbytes, timeout=None) as granted:
        assert granted == Admission(queue_seconds=0.0)
        assert adm.in_use == nbytes
    assert adm.in_use == 0 and adm.queued == 0


def test_released_on_exception():
    adm = MemoryAdmission(100, max_queued=1)
    with pytest.raises(RuntimeError, match="boom"):
        with adm.reserve(70, timeout=None):
            raise RuntimeError("boom")
    assert adm.in_use == 0


@pytest.mark.parametrize("budget, nbytes", [(100, 101), (1, 2), (1000, 10**9)])
def test_too_big_for_budget_is_rejected(budget, nbytes):
    adm = MemoryAdmission(budget, max_queued=8)
    with pytest.raises(ResourceExhausted) as info:
        with adm.reserve(nbytes, timeout=None):
            pytest.fail("must not be admitted")
    message = str(info.value)
    assert str(nbytes) in message and str(budget) in message and "--memory-budget-bytes" in message
    assert adm.in_use == 0 and adm.queued == 0


@pytest.mark.parametrize("max_queued", [0, 1, 3])
def test_queue_full_is_rejected(max_queued):
    adm = MemoryAdmission(100, max_queued=max_queued)
    stop = threading.Event()
    with adm.reserve(100, timeout=None):
        waiters = [
            in_thread(reserve_and(adm, 10, cancelled=stop.is_set, timeout=None))
            for _ in range(max_queued)
        ]
        wait_until(lambda: adm.queued == max_queued)
        with pytest.raises(ResourceExhausted, match="--max-queued-requests"):
            with adm.reserve(10, timeout=None):
                pytest.fail("must not be admitted")
        stop.set()
        join(*(thread for thread, _ in waiters))
    assert all(isinstance(box["error"], Cancelled) for _, box in waiters)
    assert adm.in_use == 0 and adm.queued == 0


def test_waiter_gets_in_after_release():
    adm = MemoryAdmission(100, max_queued=4)
    with adm.reserve(80, timeout=None):
        thread, box = in_thread(reserve_and(adm, 50))
        wait_until(lambda: adm.queued == 1)
        assert adm.in_use == 80
    join(thread)
    assert box["value"].queue_seconds > 0
    assert adm.in_use == 0 and adm.queued == 0


def test_fifo_big_head_served_before_small_that_fits():
    adm = MemoryAdmission(100, max_queued=4)
    order: list[str] = []
    with adm.reserve(60, timeout=None):
        big, big_box = in_thread(reserve_and(adm, 80, lambda: order.append("big")))
        wait_until(lambda: adm.queued == 1)
        small, small_box = in_thread(reserve_and(adm, 30, lambda: order.append("small")))
        wait_until(lambda: adm.queued == 2)
        assert adm.in_use == 60 and order == []  # 60 + 30 fits, but small is not the head
    join(big, small)
    assert order == ["big", "small"]
    assert "error" not in big_box and "error" not in small_box


def test_try_acquire_takes_only_what_fits_with_nobody_ahead():
    adm = MemoryAdmission(100, max_queued=4)
    assert adm.try_acquire(60) and adm.in_use == 60
    assert not adm.try_acquire(50) and adm.in_use == 60  # does not fit: nothing taken
    thread, box = in_thread(reserve_and(adm, 80))
    wait_until(lambda: adm.queued == 1)
    assert not adm.try_acquire(30)  # fits, but a waiter is ahead (FIFO)
    adm.release(60)
    join(thread)
    assert adm.try_acquire(100) and adm.in_use == 100
    adm.release(100)
    with pytest.raises(ResourceExhausted, match="--memory-budget-bytes"):
        adm.try_acquire(101)
    with pytest.raises(ValueError):
        adm.try_acquire(-1)


def test_timeout_raises_and_frees_the_queue_slot():
    adm = MemoryAdmission(100, max_queued=1)
    with adm.reserve(100, timeout=None):
        for _ in range(2):  # the second attempt proves the slot was released
            with pytest.raises(DeadlineExceeded, match="10 bytes"):
                with adm.reserve(10, timeout=0.05):
                    pytest.fail("must not be admitted")
            assert adm.queued == 0
    assert adm.in_use == 0


def test_head_leaving_wakes_the_next_waiter():
    adm = MemoryAdmission(100, max_queued=4)
    entered = threading.Event()
    with adm.reserve(60, timeout=None):
        big, big_box = in_thread(reserve_and(adm, 80, timeout=0.1))
        wait_until(lambda: adm.queued == 1)
        small, small_box = in_thread(reserve_and(adm, 30, entered.set, timeout=None))
        assert entered.wait(timeout=5)  # admitted while the 60 bytes are still held
        join(big, small)
    assert isinstance(big_box["error"], DeadlineExceeded)
    assert "error" not in small_box
    assert adm.in_use == 0 and adm.queued == 0


@pytest.mark.parametrize("already_cancelled", [True, False])
def test_cancelled_while_waiting(already_cancelled):
    adm = MemoryAdmission(100, max_queued=2)
    stop = threading.Event()
    if already_cancelled:
        stop.set()
    with adm.reserve(100, timeout=None):
        thread, box = in_thread(reserve_and(adm, 10, cancelled=stop.is_set, timeout=None))
        if not already_cancelled:
            wait_until(lambda: adm.queued == 1)
            stop.set()
        join(thread)
        assert isinstance(box["error"], Cancelled) and "10 bytes" in str(box["error"])
        assert adm.queued == 0
    assert adm.in_use == 0


def test_many_threads_never_exceed_budget():
    budget, n_threads, per_thread = 1000, 16, 20
    adm = MemoryAdmission(budget, max_queued=n_threads)
    lock = threading.Lock()
    stats = {"max": 0, "done": 0}
    start = threading.Barrier(n_threads)

    def worker(seed):
        rng = random.Random(seed)
        start.wait()
        for _ in range(per_thread):
            with adm.reserve(rng.randint(1, budget), timeout=None):
                with lock:
                    stats["max"] = max(stats["max"], adm.in_use)
                    stats["done"] += 1

    workers = [in_thread(lambda seed=seed: worker(seed)) for seed in range(n_threads)]
    join(*(thread for thread, _ in workers))
    assert [box for _, box in workers if "error" in box] == []
    assert stats["done"] == n_threads * per_thread
    assert 0 < stats["max"] <= budget
    assert adm.in_use == 0 and adm.queued == 0


@pytest.mark.parametrize("budget", [0, -1])
def test_unlimited_budget_never_waits(budget):
    adm = MemoryAdmission(budget, max_queued=0)
    with adm.reserve(10**15, timeout=0) as first, adm.reserve(10**15, timeout=0) as second:
        assert first.queue_seconds == second.queue_seconds == 0.0
        assert adm.in_use == 2 * 10**15 and adm.queued == 0
    assert adm.in_use == 0


def test_lending_reserve_takes_at_once_or_waits_like_its_limiter():
    from remat_server.service.admission import FifoLimiter
    from remat_server.service.work_slots import Lending

    solves = Lending(FifoLimiter(1, 4, "solves", "--max-concurrent-solves"))
    with solves.reserve(1, timeout=None, cancelled=lambda: False) as granted:
        assert granted.queue_seconds == 0.0 and solves.in_use == 1
        with pytest.raises(DeadlineExceeded):  # full: the slow path, which waits
            with solves.reserve(1, timeout=0.01, cancelled=lambda: False):
                pass
    assert solves.in_use == 0 and solves.queued == 0
