"""Fused scaled dot-product attention (mask, causal, scale, dropout)."""

from __future__ import annotations
