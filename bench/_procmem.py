"""The process's resident memory from /proc/self (Linux): current, peak, peak reset.

VmHWM is the peak resident set size; writing "5" to /proc/self/clear_refs (Linux 4.0+)
resets it to the current RSS, so a peak can be measured over one step of a process.
"""

from __future__ import annotations

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


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
