"""Which values share a buffer, and live-byte accounting that respects it.

NumPy's transpose, broadcast_to, basic slicing and (of a C-contiguous array) reshape
return views: no new bytes, and the base buffer lives as long as any view of it.
Counting a view as a copy would overstate memory (a transposed 1 MiB activation is
not another MiB), so the simulator and the executor both account per buffer through
this module; the executor makes every "new" result a fresh C-contiguous buffer so the
static model below is exactly what NumPy does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..graph.ir import INPUT_OP, Graph, TensorType
from ..ops import registry


@dataclass(frozen=True)
class MemoryModel:
    owner: dict[str, str]  # value -> the value owning its buffer (itself when it allocates)
    nbytes: dict[str, int]  # buffer owner -> bytes it holds (0 for external values)
    source: dict[str, str] = field(default_factory=dict)  # view -> the value it views
    # node -> bytes of the temporaries its forward holds at its peak (the op's declared
    # `scratch`), besides its inputs and result; only nodes that have any.
    scratch: dict[str, int] = field(default_factory=dict)
    # The values whose buffer another value may hold: every view and every owner of one
    # (the simulator counts the others' bytes directly, without tracking buffers).
    shared: frozenset[str] = frozenset()

    def is_view(self, name: str) -> bool:
        return self.owner[name] != name


def memory_model(graph: Graph) -> MemoryModel:
    owner: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    source: dict[str, str] = {}
    scratch: dict[str, int] = {}
    contiguous: dict[str, bool] = {}
    nodes, ops = graph.nodes, registry.REGISTRY
    # Graphs repeat a few signatures many times (a chain's adds, a model's layers), so
    # each distinct (op, types, attrs) asks its scratch rule once and each type computes
    # its bytes once. The builder's signature on the node (`ir.Node.signature`) is that
    # key, ready made: building it from the input types here took half of this
    # function's time on a 100k-node chain. Nodes without one build it (`_scratch`).
    scratch_of: dict[tuple, int] = {}
    scratch_by_signature: dict[tuple, int] = {}
    bytes_of: dict[TensorType, int] = {}
    for node in graph:
        name, type_ = node.name, node.type
        definition = None if node.op == INPUT_OP else ops[node.op]
        kind = "new" if definition is None else definition.memory
        if definition is not None and definition.scratch is not None:
            signature = node.signature
            held = None if signature is None else scratch_by_signature.get(signature)
            if held is None:
                held = _scratch(definition, node, nodes, scratch_of)
                if signature is not None:
                    scratch_by_signature[signature] = held
            if held > 0:
                scratch[name] = held
        if kind == "view_if_contiguous":
            kind = "view" if contiguous[node.inputs[0]] else "new"
            contiguous[name] = True
        else:
            contiguous[name] = kind != "view"
        if kind == "view":
            owner[name] = owner[node.inputs[0]]
            source[name] = node.inputs[0]
        else:
            owner[name] = name
            if kind == "external":
                nbytes[name] = 0
            else:
                size = bytes_of.get(type_)
                nbytes[name] = bytes_of[type_] = type_.nbytes if size is None else size
    shared = frozenset(source).union(owner[view] for view in source)
    return MemoryModel(owner, nbytes, source, scratch, shared)


def _scratch(definition, node, nodes, known: dict[tuple, int]) -> int:
    """The op's declared temporaries for this node, looked up by signature in `known`
    (attrs holding arrays do not hash: those nodes ask the rule directly)."""
    types = tuple([nodes[i].type for i in node.inputs])
    attrs = node.attrs
    key = (
        (node.op, node.type, types, tuple(attrs.items())) if attrs else (node.op, node.type, types)
    )
    try:
        held = known.get(key)
    except TypeError:  # an unhashable attr
        return int(definition.scratch(node.type, *types, **node.attrs))
    if held is None:
        held = known[key] = int(definition.scratch(node.type, *types, **node.attrs))
    return held


def _view_depth(model: MemoryModel, name: str) -> int:
    """0 for a value that owns its buffer (or is external), else 1 + its source's."""
    depth, source = 0, model.source
    while name in source:
        name, depth = source[name], depth + 1
    return depth


class LiveBytes:
    """Live bytes under a schedule: a buffer counts while any value using it is live.

    A buffer is identified by its owner and a generation: when an owner is computed
    again while views of its previous buffer are still live, NumPy holds two buffers,
    so the new one counts on its own.
    """

    __slots__ = ("model", "refs", "total", "peak", "generation", "held")

    def __init__(self, model: MemoryModel, initial):
        self.model, self.refs, self.total, self.peak = model, {}, 0, 0
        self.generation: dict[str, int] = {}  # owner -> its current buffer's generation
        self.held: dict[str, tuple[str, int]] = {}  # live value -> the buffer it uses
        # Each value after the one it views: a view added before its source would count
        # the buffer twice (the source would take a new generation of it), so the total
        # would depend on the order of `initial`, a set's (the string hash's) order.
        for name in sorted(initial, key=lambda n: _view_depth(model, n)):
            self.add(name)
        self.peak = self.total  # they are live already: none is computed, with temporaries

    def add(self, name: str) -> None:
        model, held, refs = self.model, self.held, self.refs
        viewed = model.source.get(name)
        if viewed is not None and viewed in held:  # a view uses its source's buffer
            buffer = held[viewed]
        else:
            owner = name if viewed is None else model.owner[name]
            buffer = (owner, self.generation.get(owner, 0))
            if owner == name and buffer in refs:  # views still hold the old buffer
                buffer = (owner, buffer[1] + 1)
                self.generation[owner] = buffer[1]
        held[name] = buffer
        count = refs.get(buffer, 0)
        total = self.total
        if count == 0:
            self.total = total = total + model.nbytes[buffer[0]]
        refs[buffer] = count + 1
        # While `name` is computed, its temporaries sit on top of everything live.
        transient = total + model.scratch.get(name, 0)
        if transient > self.peak:
            self.peak = transient

    def remove(self, name: str) -> None:
        buffer = self.held.pop(name)
        count = self.refs[buffer] - 1
        if count == 0:
            del self.refs[buffer]
            self.total -= self.model.nbytes[buffer[0]]
        else:
            self.refs[buffer] = count

    def in_use(self, owner: str) -> int:
        """How many live values use `owner`'s current buffer (views included)."""
        return self.refs.get((owner, self.generation.get(owner, 0)), 0)

    def count(self, name: str) -> int:
        """How many live values use the buffer live value `name` uses."""
        return self.refs.get(self.held[name], 0) if name in self.held else 0

    def allocates(self, name: str) -> int:
        """Bytes that computing `name` now would add (its temporaries not included: see
        `needs`)."""
        viewed = self.model.source.get(name)
        if viewed in self.held:
            return 0
        owner = self.model.owner[name]
        if owner != name:  # a view whose source is not live: its owner's buffer, if gone
            return 0 if self.in_use(owner) else self.model.nbytes[owner]
        return self.model.nbytes[owner]

    def needs(self, name: str) -> int:
        """Bytes on top of the live ones while `name` is computed now: its result's new
        buffer and its temporaries."""
        return self.allocates(name) + self.model.scratch.get(name, 0)
