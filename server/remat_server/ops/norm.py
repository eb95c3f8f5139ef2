"""Normalization ops: batch_norm (training and inference forms) and rms_norm."""

from __future__ import annotations
