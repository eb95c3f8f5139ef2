"""The process's resident memory from /proc/self (Linux): current, peak, peak reset.

VmHWM is the peak resident set size; writing "5" to /proc/self/clear_refs (Linux 4.0+)
resets it to the current RSS, so a peak can be measured over one step of a process.
"""

from __future__ import annotations

MiB = 1 << 20


def status_field(field: str, pid: int | str = "self") -> int:
    """A number from /proc/<pid>/status (kB for sizes), e.g. "VmRSS" or "Threads"."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _status_kib(field: str) -> int:
    return status_field(field)


def rss_bytes(pid: int | str = "self") -> int:
    return status_field("VmRSS", pid) * 1024


# Where a glibc process's resident memory lives, told apart by mapping (smaps): the main
# heap, the 64 MiB-aligned heaps of the threads' arenas, thread stacks (8 MiB, the
# default ulimit), other anonymous mappings (big arrays mmap'd on their own, Python's
# object arenas), and files (code, shared libraries, and shared anonymous memory such
# as the server's upload buffer pool, which reads as /dev/zero).
ARENA_HEAP_BYTES = 64 << 20
STACK_BYTES = 8 << 20


def rss_by_mapping(pid: int | str = "self") -> dict[str, int]:
    """Resident bytes by kind of mapping: heap, arenas, stacks, anonymous, files. An
    arena heap is the 64 MiB-aligned region from its first mapping on (glibc reserves
    64 MiB and grows and shrinks the readable part, which can split it into several
    mappings); a stack is told by its size only, so the split is approximate."""
    mappings = []  # (start, end, path, rss)
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mappings.append([start, end, fields[5] if len(fields) > 5 else "", 0])
            elif fields[0] == "Rss:":
                mappings[-1][3] = int(fields[1]) * 1024
    heaps = {
        start // ARENA_HEAP_BYTES
        for start, end, path, _ in mappings
        if not path and start % ARENA_HEAP_BYTES == 0 and end - start <= ARENA_HEAP_BYTES
    }
    kinds: dict[str, int] = dict.fromkeys(("heap", "arenas", "stacks", "anonymous", "files"), 0)
    for start, end, path, rss in mappings:
        if path == "[heap]":
            kind = "heap"
        elif path.startswith("/"):  # shared anonymous memory reads "/dev/zero (deleted)"
            kind = "files"
        elif not path and start // ARENA_HEAP_BYTES in heaps:
            kind = "arenas"
        elif end - start == STACK_BYTES or path == "[stack]":
            kind = "stacks"
        else:
            kind = "anonymous"
        kinds[kind] += rss
    return kinds


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def reset_works() -> bool:
    """Whether reset_hwm really lowers VmHWM here: touch 64 MiB, free it, reset.
    bench/checkpoint.py asks once, in its own process."""
    block = bytearray(64 * MiB)
    for i in range(0, len(block), 4096):  # write every page, so all of it is resident
        block[i] = 1
    del block
    reset_hwm()
    return hwm_bytes() < rss_bytes() + 32 * MiB
