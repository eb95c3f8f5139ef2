"""Which values share a buffer, and live-byte accounting that respects it.

NumPy's transpose, broadcast_to, basic slicing and (of a C-contiguous array) reshape
return views: no new bytes, and the base buffer lives as long as any view of it.
Counting a view as a copy would overstate memory (a transposed 1 MiB activation is
not another MiB), so the simulator and the executor both account per buffer through
this module; the executor makes every "new" result a fresh C-contiguous buffer so the
static model below is exactly what NumPy does.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph
from ..ops import registry


@dataclass(frozen=True)
class MemoryModel:
    owner: dict[str, str]  # value -> the value owning its buffer (itself when it allocates)
    nbytes: dict[str, int]  # buffer owner -> bytes it holds (0 for external values)

    def is_view(self, name: str) -> bool:
        return self.owner[name] != name


def memory_model(graph: Graph) -> MemoryModel:
    owner: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    contiguous: dict[str, bool] = {}
    for node in graph:
        kind = "new" if node.is_input else registry.get(node.op).memory
        if kind == "view_if_contiguous":
            kind = "view" if contiguous[node.inputs[0]] else "new"
            contiguous[node.name] = True
        else:
            contiguous[node.name] = kind != "view"
        if kind == "view":
            owner[node.name] = owner[node.inputs[0]]
        else:
            owner[node.name] = node.name
            nbytes[node.name] = 0 if kind == "external" else node.type.nbytes
    return MemoryModel(owner, nbytes)


class LiveBytes:
    """Live bytes under a schedule: a buffer counts while any value using it is live."""

    __slots__ = ("model", "refs", "total", "peak")

    def __init__(self, model: MemoryModel, initial):
        self.model, self.refs, self.total, self.peak = model, {}, 0, 0
        for name in initial:
            self.add(name)

    def add(self, name: str) -> None:
        buffer = self.model.owner[name]
        count = self.refs.get(buffer, 0)
        if count == 0:
            self.total += self.model.nbytes[buffer]
            if self.total > self.peak:
                self.peak = self.total
        self.refs[buffer] = count + 1

    def remove(self, name: str) -> None:
        buffer = self.model.owner[name]
        count = self.refs[buffer] - 1
        if count == 0:
            del self.refs[buffer]
            self.total -= self.model.nbytes[buffer]
        else:
            self.refs[buffer] = count
