"""Logical ops on bool tensors and NaN tests; none has a gradient."""

from __future__ import annotations
