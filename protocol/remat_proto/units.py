"""Byte sizes for people: formatted in tables and labels, parsed from command lines.

>>> format_bytes(1536), short_size(3 << 30), parse_size("512MiB")
('1.50 KiB', '3GiB', 536870912)
"""

from __future__ import annotations

import re

_BINARY = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
UNITS = {
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)")


def format_bytes(n: int) -> str:
    """For tables: two decimals and a spaced unit, 1536 -> '1.50 KiB'."""
    for unit, scale in _BINARY:
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def short_size(n: int) -> str:
    """For labels: compact, 1536 -> '1.5KiB', 100 -> '100B'."""
    for unit, scale in _BINARY:
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n}B"


def split_size(text: str) -> tuple[float, str] | None:
    """(number, lower-case unit or "") of "2GiB", "0.5", "512 mb"; None if not a size."""
    match = _SIZE.fullmatch(text.strip().lower())
    if not match or (match.group(2) and match.group(2) not in UNITS):
        return None
    return float(match.group(1)), match.group(2)


def parse_size(text: str) -> int:
    """Bytes from "2GiB", "512MiB", "1000000" (a bare number is bytes); ValueError else."""
    parts = split_size(text)
    if parts is None:
        raise ValueError(f"{text!r} is not a size (e.g. 512MiB, 2GiB, 1000000)")
    number, unit = parts
    return int(number * UNITS[unit or "b"])
