"""Receive buffers for RunStream uploads, kept for reuse.

The first write to fresh memory costs a page fault per 4 KiB page, and the kernel
zeroes each page; on a virtual machine that costs about as much as copying the bytes
in, and more when transparent huge pages have to be compacted first (measured in
bench/README.md). A server receiving big tensors again and again would pay it on every
request, so upload buffers come from this pool and go back to it once nothing uses
them any more.

"Nothing uses it" is decided by reference count: the pool holds the one reference to
each block of its own, and every array cut from a block (NumPy views keep their base
alive) adds one, so a block whose count is back to the pool's own is free, however
the run aliased or dropped its inputs. CPython's reference counts are exact, so a
block is never handed out while an array over it lives.

Idle blocks are kept up to `max_idle_bytes` (server flag --buffer-pool-bytes); the
oldest go first beyond it. Blocks in use are the requests' memory, which the
request limits and the memory budget already bound. When the server goes idle
(`shrink`, from the allocator's idle trimmer), idle blocks beyond the most that was in
use at once since the last time are unmapped: a loop of uploads keeps its blocks, but
a rare burst of concurrent uploads does not raise the idle memory for good (under
bench/load.py's 32 clients it ratcheted up by 12 MiB over three minutes).
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import numpy as np

MIN_POOLED_BYTES = 1 << 20  # smaller buffers come from malloc's own free lists


def _mapped(nbytes: int) -> np.ndarray:
    """A block of its own anonymous mapping, outside malloc's heap: the pool keeps its
    blocks for long, and a long-lived block in the heap would pin the memory around it
    (freed request buffers glibc could otherwise give back)."""
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


class BufferPool:
    """`array(shape, dtype)`: an uninitialized array, on a reused block when one fits.

    >>> pool = BufferPool(max_idle_bytes=64 << 20)
    >>> a = pool.array((1 << 20,), np.float32)
    >>> address = a.ctypes.data
    >>> del a  # its block is idle again
    >>> pool.array((1 << 20,), np.float32).ctypes.data == address
    True
    """

    def __init__(self, max_idle_bytes: int):
        self.max_idle_bytes = max_idle_bytes
        self._blocks: list[np.ndarray] = []  # uint8 blocks, oldest first, in use or idle
        self._lock = threading.Lock()
        self.reused = 0  # arrays served from an idle block (for tests and benchmarks)
        self._peak_in_use = 0  # most bytes of blocks in use at once since the last shrink

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES or nbytes > self.max_idle_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            block = self._idle_block(nbytes)
            if block is None:
                self._trim(self.max_idle_bytes - nbytes)  # room for this one when it is idle
                block = _mapped(nbytes)
                self._blocks.append(block)
            else:
                self.reused += 1
            array = block[:nbytes].view(dtype).reshape(shape)
            self._peak_in_use = max(self._peak_in_use, self._in_use_bytes())
            return array

    def shrink(self) -> None:
        """Unmap idle blocks beyond the most bytes in use at once since the last shrink.

        >>> pool = BufferPool(max_idle_bytes=64 << 20)
        >>> a, b = pool.array((1 << 20,), np.uint8), pool.array((1 << 20,), np.uint8)
        >>> del a, b
        >>> pool.shrink(); pool.idle_bytes() >> 20  # two were in use at once: both kept
        2
        >>> c = pool.array((1 << 20,), np.uint8); del c
        >>> pool.shrink(); pool.idle_bytes() >> 20  # one since: one kept
        1
        """
        with self._lock:
            in_use = self._in_use_bytes()
            self._trim(max(0, self._peak_in_use - in_use))
            self._peak_in_use = in_use

    def _in_use_bytes(self) -> int:
        idle = set(self._idle_indices())
        return sum(b.nbytes for i, b in enumerate(self._blocks) if i not in idle)

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(self._blocks[i].nbytes for i in self._idle_indices())

    def _idle_indices(self) -> list[int]:
        # getrefcount's argument and the list slot: 2 references mean only the pool's.
        return [i for i in range(len(self._blocks)) if sys.getrefcount(self._blocks[i]) <= 2]

    def _idle_block(self, nbytes: int) -> np.ndarray | None:
        """The smallest idle block of nbytes to 2 * nbytes, moved to the newest end."""
        fits = [i for i in self._idle_indices() if nbytes <= self._blocks[i].nbytes <= 2 * nbytes]
        if not fits:
            return None
        best = min(fits, key=lambda i: self._blocks[i].nbytes)
        block = self._blocks.pop(best)
        self._blocks.append(block)
        return block

    def _trim(self, keep_bytes: int) -> None:
        """Drop the oldest idle blocks until the idle ones total at most `keep_bytes`."""
        idle = self._idle_indices()
        total = sum(self._blocks[i].nbytes for i in idle)
        dropped = set()
        for i in idle:
            if total <= keep_bytes:
                break
            total -= self._blocks[i].nbytes
            dropped.add(i)
        self._blocks = [b for i, b in enumerate(self._blocks) if i not in dropped]
