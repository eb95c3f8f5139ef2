"""Formulas `from_torch` imports as one remat op, rewritten in the exported graph first.

Some models write an activation out in elementary ops. transformers' GPT-2 computes
its GELU (`NewGELUActivation`) as `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 *
x**3)))`: eight ATen ops, whose backward pass reads four values of the activation's
size (x, 0.5 x, the tanh and 1 + tanh), where `gelu(x, approximate="tanh")`, the same
function, reads x alone, and its gradient op needs no value of that size besides. On
the zoo's GPT-2 that is most of what store_all holds between the two matmuls of each
MLP. So the formula is replaced by `aten.gelu` before the walk, where nothing else
reads its intermediate values (`torch.fx.subgraph_rewriter` matches only such
subgraphs, with the literals equal). The results agree with the formula to rounding.

    >>> # fuse(torch, exported)   # -> {"gelu (tanh form)": 4} on the zoo's GPT-2
"""

from __future__ import annotations

import math


def _patterns(aten) -> list[tuple[str, object, object]]:
    """(name, pattern, replacement): functions of ATen ops, as torch.export writes them."""

    def new_gelu(x):  # transformers' NewGELUActivation (GPT-2's "gelu_new")
        half = aten.mul.Tensor(x, 0.5)
        cubic = aten.mul.Tensor(aten.pow.Tensor_Scalar(x, 3.0), 0.044715)
        inner = aten.mul.Tensor(aten.add.Tensor(x, cubic), math.sqrt(2.0 / math.pi))
        return aten.mul.Tensor(half, aten.add.Tensor(aten.tanh.default(inner), 1.0))

    def gelu_tanh(x):
        return aten.gelu.default(x, approximate="tanh")

    return [("gelu (tanh form)", new_gelu, gelu_tanh)]


def fuse(torch, exported) -> dict[str, int]:
    """Replace each known formula in `exported`'s graph (in place) by its one op;
    returns how many of each were replaced. The new node takes the metadata (shape,
    dtype, module path) of the node whose value it replaces."""
    from torch.fx import subgraph_rewriter

    counts = {}
    for name, pattern, replacement in _patterns(torch.ops.aten):
        replaced = subgraph_rewriter.replace_pattern_with_filters(
            exported.graph_module, pattern, replacement
        )
        for match in replaced:
            replaced_node = match.nodes_map[match.anchor]  # the formula's result
            for node in match.replacements:
                node.meta.update(replaced_node.meta)
        if replaced:
            counts[name] = len(replaced)
    return counts
