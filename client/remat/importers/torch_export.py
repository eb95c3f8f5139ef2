"""`remat.from_torch`: a PyTorch module as a remat graph, through torch.export.

The module is exported with `torch.export.export` (the training IR: pre-dispatch ATen,
where `aten.linear`, `aten.batch_norm` and `aten.scaled_dot_product_attention` are
still whole ops) and its graph is walked node by node:

- parameters and buffers become graph inputs under their PyTorch names, their values
  go into `params`; tied parameters (GPT-2's `lm_head.weight` is `transformer.wte.weight`)
  are one input, under the name `module.named_parameters()` gives, so their gradients
  add up as in torch;
- anything that depends on no input (arange, full, masks built from them, shape
  arithmetic, lifted tensor constants) is folded at import by running the ATen op
  itself, so its value is exactly torch's and none of it is sent as work;
- every other node is mapped onto remat ops by the table in `aten_table`, choosing the
  mapping whose derivative follows PyTorch where the math leaves it open (first-index
  max pooling and torch.max(dim), clamp's inclusive bounds, ReLU at 0);
- in-place ops rebind the value they mutate; buffers a training step mutates
  (BatchNorm running statistics, num_batches_tracked) come out as `updated/<name>`.

Every unsupported node is collected, and one `UnsupportedTorchOpsError` lists them all.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ..graph import Graph, Node
from . import aten_math, aten_nn, aten_shape, aten_table, torch_fusions  # noqa: F401 (registration)
from .torch_context import ImportContext
from .torch_values import Tensor, Unsupported, remat_dtype

INSTALL_HINT = 'from_torch needs PyTorch: pip install "remat[torch]"'


def import_torch():
    """torch, imported on first use: `import remat` must not need it."""
    try:
        import torch
    except ImportError as error:  # pragma: no cover - torch is installed in tests
        raise ImportError(INSTALL_HINT) from error
    return torch


class UnsupportedTorchOpsError(NotImplementedError):
    """The model uses ATen ops (or forms of them) remat cannot import. `problems`
    lists every one: (node name, ATen op, module path, reason)."""

    def __init__(self, problems: list[tuple[str, str, str, str]]):
        self.problems = problems
        by_op: dict[str, list[str]] = {}
        for node, op, module, reason in problems:
            where = f"{node} ({module})" if module else node
            by_op.setdefault(op, []).append(where + (f": {reason}" if reason else ""))
        lines = [f"  {op}: " + "; ".join(places) for op, places in sorted(by_op.items())]
        super().__init__(
            f"from_torch cannot import {len(by_op)} ATen op(s) of this model "
            f"({len(problems)} node(s)):\n" + "\n".join(lines)
        )


class _Poison:
    """The value of a node that could not be imported; its users are skipped quietly."""

    def __repr__(self) -> str:
        return "<unimported>"


POISON = _Poison()


class Args(dict):
    """An ATen call's arguments by schema name, defaults filled in: `a.self`, `a.dim`."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


def from_torch(
    module, args, kwargs=None, *, seed: int = 0, name: str | None = None, fuse: bool = True
):
    """Import a PyTorch module: returns `(graph, params)`.

    The module is exported with `torch.export.export(module, args, kwargs)` and mapped
    op by op onto remat ops. `params` maps every parameter and buffer to a NumPy array
    under its PyTorch name; each is a graph input of that name. The inputs are named
    after forward's arguments. A single output is named `output`, a tuple's elements
    `output_0`, `output_1`, ..., a dict's (or a transformers ModelOutput's) by their
    keys (pass `return_dict=False` to a transformers model for a plain tuple).

    A module in train() mode imports its training semantics: BatchNorm normalizes with
    batch statistics and the running statistics it would update come out as
    `updated/<buffer>` outputs (num_batches_tracked too); dropout is active, its masks
    drawn from `seed` and the node's name (so they differ from torch's). A module in
    eval() mode imports inference semantics. Shapes are those of the example inputs.
    A formula remat has one op for is imported as that op (`torch_fusions`: GPT-2's
    GELU, written out in eight ops, becomes `gelu(approximate="tanh")`, whose backward
    holds a quarter of the memory); `fuse=False` imports op by op.

        >>> import numpy as np, torch, remat
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(3, 4)
        ...         self.bn = torch.nn.BatchNorm1d(4)
        ...
        ...     def forward(self, x):
        ...         return torch.relu(self.bn(self.fc(x)))
        >>> _ = torch.manual_seed(0)
        >>> net = Net().double()  # in train() mode: BatchNorm uses batch statistics
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> graph, params = remat.from_torch(net, (x,))
        >>> list(params)[:3], graph["x"].dtype
        (['fc.weight', 'fc.bias', 'bn.weight'], 'float64')
        >>> for output in graph.output_names:
        ...     print(output)
        output
        updated/bn.running_mean
        updated/bn.running_var
        updated/bn.num_batches_tracked
        >>> loss = graph.output("loss", remat.sum(graph["output"]))
        >>> with remat.Client.in_process() as client:
        ...     result = client.run(
        ...         graph, {**params, "x": x.numpy()}, wrt=["fc.weight"], loss="loss"
        ...     )
        >>> net(x).sum().backward()
        >>> bool(np.allclose(result.grads["fc.weight"], net.fc.weight.grad.numpy()))
        True
        >>> bool(np.allclose(result.outputs["updated/bn.running_var"], net.bn.running_var))
        True

    Raises `UnsupportedTorchOpsError` listing every ATen op the model uses that remat
    cannot import (with node names and module paths), and ImportError without torch.
    """
    torch = import_torch()

    if not isinstance(args, (tuple, list)):
        args = (args,)
    exported = torch.export.export(module, tuple(args), dict(kwargs or {}))
    if fuse:
        torch_fusions.fuse(torch, exported)
    graph_name = name or type(module).__name__
    return _Importer(torch, exported, aten_table, seed, graph_name, type(module).__name__).run()


class _Importer(ImportContext):
    """One walk over an ExportedProgram's graph; also the context op handlers use."""

    def __init__(self, torch, exported, table, seed: int, name: str, root: str):
        self.torch, self.ep, self.table, self.seed = torch, exported, table, seed
        self.root = root  # the root module's class name: the source of its own nodes
        self.graph = Graph(name)
        self.params: dict[str, np.ndarray] = {}
        self.env: dict[Any, Any] = {}  # fx node -> Tensor | constant | list | POISON
        self.problems: list[tuple[str, str, str, str]] = []
        self.buffers: dict[str, Any] = {}  # buffer name -> its placeholder
        self._initial: dict[Any, Tensor] = {}  # placeholder -> its input's value
        self._mutations: list[tuple[str, Any]] = []  # (argument, new value) of a handler
        # In-place results alias the tensor they wrote: root -> its aliases, and back.
        self._aliases: dict[Any, list] = {}
        self._root: dict[Any, Any] = {}
        self._constants: dict[Any, Node] = {}  # materialized constants, by identity
        self._keep: list[Any] = []  # keeps cached constants alive (ids stay unique)
        # The node being imported (handlers read its output's shape and dtype).
        self.fx = None
        self.source = ""
        self._prefix = ""

    # --- the walk ---------------------------------------------------------------------
    def run(self) -> tuple[Graph, dict[str, np.ndarray]]:
        self._bind_inputs()
        for fx in self.ep.graph.nodes:
            if fx.op == "call_function":
                self._call(fx)
            elif fx.op == "output":
                self._outputs(fx)
            elif fx.op == "get_attr":  # a subgraph of a higher-order op
                self.env[fx] = getattr(self.ep.graph_module, fx.target)
        if self.problems:
            raise UnsupportedTorchOpsError(self.problems)
        return self.graph, self.params

    def _bind_inputs(self) -> None:
        torch, ep = self.torch, self.ep
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        seen: dict[tuple, Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            fx = placeholders[spec.arg.name]
            kind, target = spec.kind.name, spec.target
            if kind in ("PARAMETER", "BUFFER"):
                tensor = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
                key = _storage_key(tensor)
                if key is not None and key in seen:  # a tied parameter: one input
                    self.env[fx] = seen[key]
                    continue
                value = self._graph_input(fx, target, tensor)
                if key is not None:
                    seen[key] = value
                if kind == "BUFFER":
                    self.buffers[target] = fx
            elif kind == "CONSTANT_TENSOR":
                self.env[fx] = ep.constants[target].detach().clone()
            elif kind == "USER_INPUT":
                if isinstance(spec.arg, torch.export.graph_signature.TensorArgument):
                    example = fx.meta["val"]
                    self.env[fx] = self._graph_input(fx, spec.arg.name, example, value=False)
                else:
                    self.env[fx] = getattr(spec.arg, "value", None)
            else:
                self._problem(fx, kind.lower(), f"{kind} inputs are not supported")
                self.env[fx] = POISON

    def _graph_input(self, fx, name: str, tensor, value: bool = True) -> Any:
        try:
            dtype = remat_dtype(tensor.dtype)
        except Unsupported as error:
            self._problem(fx, "input " + name, str(error))
            self.env[fx] = POISON
            return POISON
        node = self.graph.input(name, tuple(tensor.shape), dtype)
        if value:
            self.params[name] = tensor.detach().cpu().numpy().copy()
        result = Tensor(node, tuple(tensor.shape), tensor.dtype)
        self.env[fx] = self._initial[fx] = result
        return result

    def _call(self, fx) -> None:
        args = _map(fx.args, self.env)
        kwargs = _map(fx.kwargs, self.env)
        flat = _flatten((args, kwargs))
        if any(v is POISON for v in flat):
            self.env[fx] = POISON
            return
        target = fx.target
        if target is operator.getitem:
            self.env[fx] = args[0][args[1]]
            return
        if target is getattr(self.torch.ops.higher_order, "wrap_with_set_grad_enabled", None):
            self._grad_region(fx, args)
            return
        if isinstance(target, self.torch._ops.HigherOrderOperator):
            self._problem(fx, str(target), "higher-order ops (control flow) are not supported")
            self.env[fx] = POISON
            return
        if not hasattr(target, "_schema"):  # Python builtins on sym-ints: fold
            self._fold(fx, target, args, kwargs)
            return
        packet = target.overloadpacket.__name__
        overload = target._overloadname
        schema = target._schema
        mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        base = packet[:-1] if mutated and packet.endswith("_") else packet
        dynamic = any(isinstance(v, Tensor) for v in flat)
        if base in self.table.RANDOM:
            self._problem(fx, str(target), "random ops would bake one sample into the graph")
            self.env[fx] = POISON
            return
        if not dynamic or base in self.table.META:
            if dynamic:  # only shapes and dtypes are read: feed zeros of that kind
                args, kwargs = _map((args, kwargs), self._stand_in)
            self._fold(fx, target, args, kwargs)
            return
        handler = self.table.HANDLERS.get(f"{base}.{overload}") or self.table.HANDLERS.get(base)
        if handler is None:
            self._problem(fx, str(target), "")
            self.env[fx] = POISON
            return
        bound = _bind(schema, args, kwargs)
        self.fx, self.source = fx, f"{_module_path(fx) or self.root} (aten.{packet})"
        self._prefix = fx.name
        first, self._mutations = len(self.graph.nodes), [(name, None) for name in mutated]
        try:
            result = self._wrap(handler(self, bound), fx.meta.get("val"))
        except Unsupported as error:
            self._problem(fx, str(target), str(error))
            self.env[fx] = POISON
            return
        except Exception as error:  # a bug here or a form the table did not foresee
            raise RuntimeError(
                f"from_torch failed on node {fx.name!r} ({target}, {self.source}): {error}"
            ) from error
        self._stamp(first)
        self.env[fx] = result
        arg_nodes = _bind(schema, fx.args, fx.kwargs)
        for name, value in self._mutations:
            source = arg_nodes.get(name)
            if source is not None and hasattr(source, "op"):
                self._rebind(fx, source, result if value is None else value, value is None)

    def _grad_region(self, fx, args) -> None:
        """`with torch.no_grad():` in forward: its subgraph inlined, its float results
        cut from the gradient (a set_grad_enabled(True) region is inlined as is)."""
        enabled, subgraph, *inputs = args
        placeholders = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
        self.env.update(zip(placeholders, inputs))
        results = []
        for node in subgraph.graph.nodes:
            if node.op == "call_function":
                self._call(node)
            elif node.op == "get_attr":
                self.env[node] = getattr(subgraph, node.target)
            elif node.op == "output":
                results = list(_map(node.args[0], self.env))
        self.fx, self._prefix = fx, fx.name
        self.source = f"{_module_path(fx) or self.root} (torch.no_grad)"
        if not enabled:
            results = [
                Tensor(self.stop_gradient(v.node, v.shape, v.dtype), v.shape, v.dtype)
                if isinstance(v, Tensor) and v.dtype.is_floating_point
                else v
                for v in results
            ]
        self.env[fx] = tuple(results)

    def _fold(self, fx, target, args, kwargs) -> None:
        try:
            with self.torch.no_grad():
                self.env[fx] = target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - reported with the node
            self._problem(fx, str(target), f"could not fold a constant: {error}")
            self.env[fx] = POISON

    def mutate(self, argument: str, value: Tensor) -> None:
        """The handled op also writes `value` into its argument `argument` (batch_norm's
        running statistics)."""
        self._mutations.append((argument, value))

    def _stand_in(self, value):
        if isinstance(value, Tensor):
            return self.torch.zeros(value.shape, dtype=value.dtype)
        return value

    def _rebind(self, fx, source, value, aliased: bool) -> None:
        """An in-place write of `value` into `source`: later uses of it (and of every
        earlier in-place result aliasing it) see the new value. `aliased`: the node's
        own result is that tensor too (add_, not batch_norm's running statistics)."""
        root = self._root.get(source, source)
        producer = getattr(root, "target", None)
        schema = getattr(producer, "_schema", None)
        if schema is not None and schema.returns and schema.returns[0].alias_info is not None:
            self._problem(fx, str(fx.target), "in-place update of a view is not supported")
            return
        members = self._aliases.setdefault(root, [root])
        if aliased and fx not in members:
            members.append(fx)
            self._root[fx] = root
        for member in members:
            self.env[member] = value

    def _outputs(self, fx) -> None:
        torch = self.torch
        from torch.utils import _pytree as pytree

        leaves = list(fx.args[0])
        user = [
            i
            for i, spec in enumerate(self.ep.graph_signature.output_specs)
            if spec.kind.name == "USER_OUTPUT"
        ]
        out_spec = self.ep.call_spec.out_spec
        names = _output_names(pytree, out_spec, len(user))
        self.fx, self.source, self._prefix = fx, "<output>", "output"
        for name, index in zip(names, user):
            value = self.env.get(leaves[index]) if hasattr(leaves[index], "op") else leaves[index]
            if value is POISON:
                continue
            if isinstance(value, torch.Tensor):
                value = self.const(value)
            elif isinstance(value, Tensor):
                value = value.node
            else:
                continue  # a Python number or None: not a tensor output
            self.graph.output(name, value)
        for name, placeholder in self.buffers.items():
            value = self.env[placeholder]
            if value is POISON or value is self._initial.get(placeholder):
                continue
            node = value.node if isinstance(value, Tensor) else self.const(value)
            self.graph.output(f"updated/{name}", node)

    # --- results ------------------------------------------------------------------
    def _wrap(self, result, val):
        torch = self.torch
        if isinstance(result, (list, tuple)):
            vals = val if isinstance(val, (list, tuple)) else [None] * len(result)
            return [self._wrap(r, v) for r, v in zip(result, vals)]
        if isinstance(val, torch.Tensor):
            if isinstance(result, Node):
                result = Tensor(result, tuple(val.shape), val.dtype)
            if isinstance(result, Tensor):
                want = remat_dtype(val.dtype)
                if result.node.dtype != want:
                    result = Tensor(
                        self.op("cast", [result.node], dtype=want), result.shape, val.dtype
                    )
                elif result.dtype != val.dtype or result.shape != tuple(val.shape):
                    result = Tensor(result.node, tuple(val.shape), val.dtype)
        return result

    def _stamp(self, first: int) -> None:
        """Nodes SDK composites added for this ATen node get its source too."""
        import dataclasses

        nodes = self.graph.nodes
        for i in range(first, len(nodes)):
            if nodes[i].source != self.source:
                nodes[i] = dataclasses.replace(nodes[i], source=self.source)

    def _problem(self, fx, op: str, reason: str) -> None:
        self.problems.append((fx.name, op, _module_path(fx), reason))


# --- helpers -------------------------------------------------------------------------------
def _storage_key(tensor):
    if tensor.numel() == 0:
        return None
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _module_path(fx) -> str:
    stack = fx.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path


def _map(value, env):
    """Replace fx nodes by their values (env: dict or callable on leaves)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, env) for k, v in value.items()}
    if callable(env):
        return env(value)
    if hasattr(value, "op") and hasattr(value, "target") and value in env:
        return env[value]
    return value


def _flatten(value) -> list:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flatten(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flatten(v)]
    return [value]


def _bind(schema, args, kwargs) -> Args:
    """Arguments by name; positional ones fill the schema's non-keyword-only slots."""
    bound = Args()
    for i, arg in enumerate(schema.arguments):
        if not arg.kwarg_only and i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _output_names(pytree, spec, count: int) -> list[str]:
    """`output` for one tensor, `output_<i>` for a sequence's elements, keys for a dict;
    deeper levels join with '/'."""
    if spec is None or spec.is_leaf():
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths, _ = pytree.tree_flatten_with_path(tree)
    names = []
    for path, _leaf in paths:
        parts = []
        for key in path:
            if isinstance(key, pytree.SequenceKey):
                parts.append(str(key.idx))
            elif isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(str(key.name))
            else:
                parts.append(str(key))
        if path and isinstance(path[0], pytree.SequenceKey):
            parts[0] = f"output_{parts[0]}"
        names.append("/".join(parts) or "output")
    return names[:count]
