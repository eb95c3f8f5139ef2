"""Resizing and padding of tensors: nearest and bilinear upsampling, pad."""

from __future__ import annotations
