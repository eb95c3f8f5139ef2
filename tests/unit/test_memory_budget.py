"""The default memory budget: the machine's memory read from fake cgroup v1/v2 trees
and /proc files, and the budget computed from it."""

from __future__ import annotations

import pytest

from remat_server.service.config import AUTO, ServerConfig
from remat_server.service.memory_budget import (
    MIN_SHARE,
    MachineMemory,
    default_budget,
    machine_memory,
    resolve,
)

GiB = 1 << 30
MEMINFO = "MemTotal:       25165824 kB\nMemFree:        1000 kB\n"  # 24 GiB
PHYSICAL = 24 * GiB

# (case, /proc/self/cgroup, {file under the cgroup root: content}, expected bytes, source)
CASES = [
    ("v2 limit on the process's cgroup", "0::/pod/app\n", {"pod/app/memory.max": f"{2 * GiB}\n"},
     2 * GiB, "cgroup v2 memory.max"),
    ("v2 limit on an ancestor", "0::/pod/app\n",
     {"pod/app/memory.max": "max\n", "pod/memory.max": f"{3 * GiB}\n"}, 3 * GiB,
     "cgroup v2 memory.max"),
    ("v2 the smallest of nested limits", "0::/pod/app\n",
     {"pod/app/memory.max": f"{5 * GiB}\n", "pod/memory.max": f"{4 * GiB}\n"}, 4 * GiB,
     "cgroup v2 memory.max"),
    ("v2 the container's own cgroup mounted as the root", "0::/\n",
     {"memory.max": f"{GiB}\n"}, GiB, "cgroup v2 memory.max"),
    ("v2 unlimited: physical memory", "0::/pod\n", {"pod/memory.max": "max\n"}, PHYSICAL,
     "physical memory"),
    ("v1 memory controller", "4:memory:/docker/abc\n3:cpu:/x\n",
     {"memory/docker/abc/memory.limit_in_bytes": f"{6 * GiB}\n"}, 6 * GiB,
     "cgroup v1 memory.limit_in_bytes"),
    ("v1 unlimited (LONG_MAX rounded to a page): physical", "4:memory:/docker/abc\n",
     {"memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n"}, PHYSICAL,
     "physical memory"),
    ("v1 with memory among several controllers", "5:cpu,memory:/a\n",
     {"memory/a/memory.limit_in_bytes": f"{GiB}\n"}, GiB, "cgroup v1 memory.limit_in_bytes"),
    ("a limit above the physical memory: physical", "0::/a\n",
     {"a/memory.max": f"{64 * GiB}\n"}, PHYSICAL, "physical memory"),
    ("no cgroup files at all: physical", "0::/a\n", {}, PHYSICAL, "physical memory"),
    ("garbage in the files: physical", "0::/a\nnot a line\n", {"a/memory.max": "lots\n"},
     PHYSICAL, "physical memory"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("membership", "files", "expected", "source"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_machine_memory_from_cgroups(tmp_path, membership, files, expected, source):
    root = tmp_path / "cgroup"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (tmp_path / "cgroup-membership").write_text(membership)
    (tmp_path / "meminfo").write_text(MEMINFO)
    found = machine_memory(
        cgroup_root=root,
        proc_cgroup=tmp_path / "cgroup-membership",
        meminfo=tmp_path / "meminfo",
    )
    assert found == MachineMemory(expected, source)


def test_an_override_wins_over_everything():
    assert machine_memory(override=5 * GiB) == MachineMemory(5 * GiB, "--machine-memory-bytes")


def test_this_machine_has_some_memory():
    found = machine_memory()
    assert found.bytes > 0 and found.source


@pytest.mark.parametrize(
    ("memory", "fraction", "workers", "reserved", "expected", "floored"),
    [
        (8 * GiB, 0.5, 1, GiB, 3 * GiB, False),
        (8 * GiB, 0.5, 2, GiB, GiB, False),  # each worker: 2 GiB less its own caches
        (8 * GiB, 1.0, 1, 0, 8 * GiB, False),
        (2 * GiB, 0.5, 1, 3 * GiB // 2, int(GiB * MIN_SHARE), True),  # caches bigger
    ],
)
def test_default_budget(memory, fraction, workers, reserved, expected, floored):
    budget = default_budget(MachineMemory(memory, "test"), fraction, workers, reserved)
    assert (budget.bytes, budget.floored) == (expected, floored)
    assert ("floored" in budget.explain()) == floored


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        default_budget(MachineMemory(GiB, "test"), fraction, 1, 0)


def test_resolve_keeps_an_explicit_budget_and_decides_the_default():
    explicit = ServerConfig(memory_budget_bytes=0)  # "no budget", asked for
    assert resolve(explicit) == (explicit, None)
    assert ServerConfig().memory_budget_bytes == AUTO  # the default is decided at start
    config, budget = resolve(
        ServerConfig(machine_memory_bytes=16 * GiB, buffer_pool_bytes=GiB), workers=2
    )
    caches = ServerConfig().graph_cache_bytes + ServerConfig().compile_cache_bytes + GiB
    assert config.memory_budget_bytes == 4 * GiB - caches == budget.bytes
