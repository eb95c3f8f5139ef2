"""remat_server.runtime.buffers.BufferPool: upload buffers are reused once nothing refers to
them, never while a view lives, and idle ones are bounded in bytes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from remat_server.runtime.buffers import MIN_POOLED_BYTES, BufferPool

MiB = 1 << 20


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_free_block_is_reused_for_the_next_array_of_its_size():
    pool = BufferPool(64 * MiB)
    first = pool.array((MiB,), np.float32)
    where = address(first)
    del first
    again = pool.array((2, MiB // 2), np.float32)
    assert address(again) == where and pool.reused == 1
    assert again.shape == (2, MiB // 2) and again.dtype == np.float32 and again.flags.writeable


@pytest.mark.parametrize(
    "keep",
    [
        lambda a: a.reshape(-1),
        lambda a: a[1:],
        lambda a: a.view(np.uint8),
        lambda a: memoryview(a),
        lambda a: np.asarray(a).T,
    ],
)
def test_a_block_is_not_reused_while_any_view_of_it_lives(keep):
    pool = BufferPool(64 * MiB)
    first = pool.array((MiB,), np.float32)
    first[:] = 7
    view = keep(first)
    expected = np.array(view, copy=True)
    del first
    other = pool.array((MiB,), np.float32)
    other[:] = 0
    assert pool.reused == 0
    assert np.array_equal(np.asarray(view), expected)  # untouched by the new array's writes
    del other, view
    pool.array((MiB,), np.float32)
    assert pool.reused == 1


@pytest.mark.parametrize(
    "nbytes, reused",
    [
        (4 * MiB, True),
        (3 * MiB, True),
        (2 * MiB, True),  # 4 MiB block: within 2x
        (int(1.9 * MiB) // 4 * 4, False),  # would waste more than half the block
        (5 * MiB, False),  # too big
    ],
)
def test_a_block_serves_sizes_up_to_twice_smaller(nbytes, reused):
    pool = BufferPool(64 * MiB)
    pool.array((4 * MiB,), np.uint8)  # dropped at once: an idle 4 MiB block
    pool.array((nbytes,), np.uint8)
    assert pool.reused == int(reused)


def test_small_arrays_and_arrays_over_the_bound_are_not_pooled():
    pool = BufferPool(8 * MiB)
    for shape in [(MIN_POOLED_BYTES // 2,), (16 * MiB,)]:
        pool.array(shape, np.uint8)
    assert pool.idle_bytes() == 0
    assert BufferPool(0).array((4 * MiB,), np.uint8).nbytes == 4 * MiB


def test_idle_blocks_are_bounded_oldest_dropped_first():
    pool = BufferPool(10 * MiB)
    held = [pool.array((4 * MiB,), np.uint8) for _ in range(3)]  # 12 MiB, all in use
    assert pool.idle_bytes() == 0
    del held
    assert pool.idle_bytes() == 12 * MiB  # idle now; trimmed at the next allocation
    pool.array((8 * MiB,), np.uint8)  # no 4 MiB block fits 8 MiB: a new one, after trimming
    assert pool.idle_bytes() <= 10 * MiB


def test_shrink_keeps_what_was_in_use_at_once_since_the_last_shrink():
    """At an idle moment the pool keeps as many idle blocks as were in use together since
    the previous one: a loop of uploads reuses its blocks, a past burst is given back."""
    pool = BufferPool(256 * MiB)
    burst = [pool.array((4 * MiB,), np.uint8) for _ in range(5)]
    del burst
    pool.shrink()
    assert pool.idle_bytes() == 20 * MiB  # the burst was the peak: all kept
    for _ in range(3):  # a loop of two uploads at a time
        pair = [pool.array((4 * MiB,), np.uint8) for _ in range(2)]
        del pair
    assert pool.reused == 6
    pool.shrink()
    assert pool.idle_bytes() == 8 * MiB  # the burst's other blocks are unmapped
    held = pool.array((4 * MiB,), np.uint8)
    pool.shrink()  # a block still in use is never dropped, nor counted as idle
    assert pool.idle_bytes() == 0 and held.nbytes == 4 * MiB


def test_concurrent_users_never_share_a_block():
    pool = BufferPool(256 * MiB)
    errors = []

    def use(value: int):
        for _ in range(20):
            array = pool.array((MiB,), np.int32)
            array[:] = value
            if not np.all(array == value):
                errors.append(value)

    threads = [threading.Thread(target=use, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.reused > 0
