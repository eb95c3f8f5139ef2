"""Reverse-mode autodiff, symbol to symbol: a graph in, the joint forward+backward
graph out (`reverse`), with VJP rules emitting nodes through `emitter`."""

from .reverse import JointGraph, differentiate

__all__ = ["JointGraph", "differentiate"]
