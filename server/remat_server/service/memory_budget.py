"""The server's default memory budget, from the memory the machine gives it.

A server is safe only if, with default flags, the requests it runs at once cannot
together ask for more memory than it has: the kernel's OOM killer would end the
process and every request on it. So at start the server reads its limit, in this order:

1. an explicit `--machine-memory-bytes` (tests, or an operator who knows better);
2. its cgroup's limit: v2 `memory.max`, or v1 `memory.limit_in_bytes`, of the cgroup
   in /proc/self/cgroup and of each parent (the smallest counts: a container's limit
   may sit on an ancestor);
3. the physical memory (/proc/meminfo MemTotal, else sysconf).

The shared budget (predicted peaks of running requests) is then
`fraction * limit / workers` less what each worker may keep besides: the graph cache,
the compile cache and the idle upload buffers. The rest of the machine (the other
`1 - fraction`) is for the interpreter, messages in flight and allocator slack.

    >>> memory = MachineMemory(8 << 30, "cgroup v2 memory.max")
    >>> budget = default_budget(memory, fraction=0.5, workers=1, reserved_bytes=1 << 30)
    >>> budget.bytes >> 20, budget.explain()
    (3072, '3.00 GiB: 50% of 8.00 GiB (cgroup v2 memory.max), less 1.00 GiB of caches and buffers')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from remat_proto.units import format_bytes

from .config import AUTO, ServerConfig

DEFAULT_FRACTION = 0.5
# The caches and buffer pool are upper bounds, not what a worker holds: when they
# would leave less than this share of its part of the memory, the budget keeps this
# share (and the start log says which flags to lower).
MIN_SHARE = 0.25
# cgroup v1 reports "no limit" as a huge number (LONG_MAX rounded down to a page).
_UNLIMITED_V1 = 1 << 62


@dataclass(frozen=True)
class MachineMemory:
    """The memory this process may use, and where that figure came from."""

    bytes: int
    source: str


@dataclass(frozen=True)
class Budget:
    """A resolved default budget, with what it was computed from (for the start log)."""

    bytes: int
    memory: MachineMemory
    fraction: float
    workers: int
    reserved_bytes: int
    floored: bool = False

    def explain(self) -> str:
        share = f"{self.fraction:.0%} of {format_bytes(self.memory.bytes)} ({self.memory.source})"
        if self.workers > 1:
            share += f" / {self.workers} workers"
        text = f"{format_bytes(self.bytes)}: {share}, less {format_bytes(self.reserved_bytes)}"
        text += " of caches and buffers"
        if self.floored:
            text += (
                f" (floored at {MIN_SHARE:.0%} of the share: lower --buffer-pool-bytes, "
                "--graph-cache-bytes or --compile-cache-bytes)"
            )
        return text


def resolve(config: ServerConfig, workers: int = 1) -> tuple[ServerConfig, Budget | None]:
    """`config` with its memory budget decided: an explicit one (0: none) is kept and
    the Budget is None; AUTO becomes each of `workers` processes' default budget.

        >>> config, budget = resolve(ServerConfig(machine_memory_bytes=16 << 30,
        ...     graph_cache_bytes=0, compile_cache_bytes=0, buffer_pool_bytes=0), workers=2)
        >>> config.memory_budget_bytes >> 30, budget.memory.source
        (4, '--machine-memory-bytes')
    """
    if config.memory_budget_bytes != AUTO:
        return config, None
    reserved = config.graph_cache_bytes + config.compile_cache_bytes + config.buffer_pool_bytes
    budget = default_budget(
        machine_memory(config.machine_memory_bytes),
        config.memory_budget_fraction,
        workers,
        reserved,
    )
    return replace(config, memory_budget_bytes=budget.bytes), budget


def machine_memory(
    override: int = 0,
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
    meminfo: str | os.PathLike = "/proc/meminfo",
) -> MachineMemory:
    """The memory this process may use (see the module docstring for the order)."""
    if override > 0:
        return MachineMemory(override, "--machine-memory-bytes")
    physical = _physical(Path(meminfo))
    limit = _cgroup_limit(Path(cgroup_root), _read(Path(proc_cgroup)))
    if limit is not None and limit[0] < physical.bytes:
        return MachineMemory(*limit)
    return physical


def default_budget(
    memory: MachineMemory, fraction: float, workers: int, reserved_bytes: int
) -> Budget:
    """Each worker's share of `fraction` of `memory`, less `reserved_bytes` (its caches
    and buffer pool), but never under MIN_SHARE of that share."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the memory budget fraction must be in (0, 1], got {fraction}")
    share = int(memory.bytes * fraction) // max(1, workers)
    floor = int(share * MIN_SHARE)
    budget = share - reserved_bytes
    return Budget(
        max(budget, floor), memory, fraction, max(1, workers), reserved_bytes, budget < floor
    )


def _physical(meminfo: Path) -> MachineMemory:
    for line in _read(meminfo).splitlines():
        if line.startswith("MemTotal:"):
            return MachineMemory(int(line.split()[1]) * 1024, "physical memory")
    return MachineMemory(
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    )


def _cgroup_limit(root: Path, membership: str) -> tuple[int, str] | None:
    """The smallest memory limit on this process's cgroup and its ancestors."""
    found: list[tuple[int, str]] = []
    for line in membership.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy
            found += _limits(root, path, "memory.max", "cgroup v2 memory.max")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own tree
            found += _limits(
                root / "memory", path, "memory.limit_in_bytes", "cgroup v1 memory.limit_in_bytes"
            )
    return min(found, default=None)


def _limits(tree: Path, path: str, name: str, source: str) -> list[tuple[int, str]]:
    """The limits in `name` files from the cgroup `path` up to the tree's root. Inside
    a container the cgroup's own directory is often mounted as the root itself, so
    the root's file counts too."""
    limits = []
    directory = Path(path.strip() or "/")
    for parent in (directory, *directory.parents):
        text = _read(tree / parent.relative_to("/") / name).strip()
        if text.isdigit() and 0 < int(text) < _UNLIMITED_V1:  # "max" or absent: none
            limits.append((int(text), source))
    return limits


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
