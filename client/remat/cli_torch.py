"""`--torch MODULE:FACTORY`: a PyTorch model as a workload for `remat compare` and
`remat plan`.

`FACTORY()`, from a module on sys.path or in the current directory (`pkg.models:make`)
or from a file (`examples/resnet_factory.py:make_model`), returns `(module,
example_args)` or `(module, example_args, example_kwargs)`. The module is imported with
`remat.from_torch`. Its example inputs are the data; the default wrt are its parameters
that require grad (not its buffers) and its float inputs; its loss is chosen or added
as for any imported model (`cli_models.model_workload`). Whatever goes wrong (no torch,
no such module or factory, a factory returning something else, an export torch
refuses) is a one-line WorkloadError.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import logging
import os
import sys
from typing import Any

import numpy as np

from .cli_models import Workload, WorkloadError, model_workload

UPDATED = "updated/"  # from_torch's outputs for the buffers a training step updates


def torch_workload(spec: str, *, wrt, loss) -> Workload:
    from remat.importers.torch_export import import_torch

    try:
        torch = import_torch()
    except ImportError as error:
        raise WorkloadError(str(error)) from None
    try:
        module, args, kwargs = _call_factory(torch, spec)
        graph, params = _from_torch(module, args, kwargs)
        outputs = _torch_outputs(torch, graph, module, args, kwargs)
    except WorkloadError as error:
        raise WorkloadError(f"--torch {spec}: {error}") from None
    data = _example_inputs(torch, graph, params, args, kwargs)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad} | set(data)
    return model_workload(
        graph,
        {**params, **data},
        outputs,
        what=f"torch {type(module).__name__} from {spec}",
        details=[f"{name} {'x'.join(map(str, x.shape))}" for name, x in data.items()][:3],
        wrt=wrt,
        loss=loss,
        trainable=trainable.__contains__,
    )


def factory_spec(text: str) -> str:
    """`MODULE:FACTORY` as --torch takes it (a usage error otherwise)."""
    module, _, factory = text.rpartition(":")
    if not module or not factory.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected MODULE:FACTORY, e.g. my_models:make_model or "
            "examples/resnet_factory.py:make_model"
        )
    return text


def _call_factory(torch, spec: str) -> tuple[Any, tuple, dict]:
    """`FACTORY()`'s (module, example_args, example_kwargs), checked."""
    module_name, _, name = spec.rpartition(":")
    factory = getattr(_import(module_name), name, None)
    if not callable(factory):
        raise WorkloadError(f"{module_name} has no function {name!r}")
    try:
        made = factory()
    except Exception as error:
        raise WorkloadError(f"{name}() raised {_gist(error)}") from None
    if isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module):
        module, args, kwargs = (*made, None) if len(made) == 2 else made
        args = (args,) if isinstance(args, torch.Tensor) else args
        if isinstance(args, (tuple, list)) and isinstance(kwargs, (dict, type(None))):
            return module, tuple(args), dict(kwargs or {})
    raise WorkloadError(
        f"{name}() returned {_kind(made)}; expected (module, example_args) or (module, "
        "example_args, example_kwargs), the module a torch.nn.Module"
    )


def _import(name: str):
    """The module `name` (from sys.path or the current directory), or the file `name`."""
    is_file = name.endswith(".py")
    if is_file and not os.path.isfile(name):
        raise WorkloadError(f"no such file {name}")
    path = list(sys.path)
    # Only while importing, as `python file.py` (its directory) or `python -m` (the
    # current one) would.
    sys.path.append(os.path.dirname(os.path.abspath(name)) if is_file else os.getcwd())
    try:
        return _import_file(name) if is_file else importlib.import_module(name)
    except Exception as error:  # ImportError, or the module's own code failing
        raise WorkloadError(f"cannot import {name}: {_gist(error)}") from None
    finally:
        sys.path[:] = path


def _import_file(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    # Registered as `import` would (dataclasses and pickle look classes up there),
    # unless a module of that name is loaded already.
    registered = sys.modules.setdefault(stem, module) is module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if registered:
            del sys.modules[stem]
        raise
    return module


def _from_torch(module, args, kwargs):
    import remat
    from remat.importers import UnsupportedTorchOpsError

    try:
        with _quiet_torch():
            return remat.from_torch(module, args, kwargs)
    except UnsupportedTorchOpsError as error:
        raise WorkloadError(str(error)) from None
    except Exception as error:  # torch.export's own errors run to pages: the gist
        raise WorkloadError(f"torch.export failed: {_gist(error)}") from None


@contextlib.contextmanager
def _quiet_torch():
    """torch, quiet while it exports: its logged warnings dropped, and what it prints
    on stderr (when the export fails, a dump of the partial graph) held back so that
    the one-line error is not buried; replayed if the export succeeds."""
    logger = logging.getLogger("torch")
    level, written = logger.level, io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(written):
            yield
    finally:
        logger.setLevel(level)
    sys.stderr.write(written.getvalue())


def _example_inputs(torch, graph, params, args, kwargs) -> dict[str, np.ndarray]:
    """The example tensors as NumPy, under the graph's names for them: its inputs that
    are not parameters or buffers, in the order torch.export flattens (args, kwargs)."""
    from torch.utils import _pytree as pytree

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [item for item in graph.inputs if item.name not in params]
    if len(tensors) != len(names):  # pragma: no cover - from_torch names every tensor input
        raise WorkloadError(f"{len(tensors)} example tensors for {len(names)} graph inputs")
    return {
        item.name: tensor.detach().cpu().numpy().astype(item.dtype, copy=False)
        for item, tensor in zip(names, tensors)
    }


def _torch_outputs(torch, graph, module, args, kwargs) -> dict[str, tuple[int, ...] | None]:
    """The module's float outputs and their shapes, from one forward pass on a copy (the
    module's own buffers untouched). The graph names its tensor outputs in order."""
    from torch.utils import _pytree as pytree

    names = [name for name in graph.output_names if not name.startswith(UPDATED)]
    try:
        with torch.no_grad():
            result = copy.deepcopy(module)(*args, **kwargs)
    except Exception as error:
        raise WorkloadError(f"the forward pass failed: {_gist(error)}") from None
    tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(names):  # pragma: no cover - the export saw the same outputs
        return dict.fromkeys(names)
    return {name: tuple(t.shape) for name, t in zip(names, tensors) if t.dtype.is_floating_point}


def _gist(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _kind(value) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"
