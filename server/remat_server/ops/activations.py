"""Activations: erf, gelu (exact and tanh forms), silu, clip, hardtanh, leaky_relu."""

from __future__ import annotations
