"""Importers: models from other frameworks as remat graphs, `(graph, params)`.

`from_torch` (torch.export's training IR) needs the `remat[torch]` extra; torch is
imported only when it is called, so `import remat` never needs it.
"""

from .torch_export import UnsupportedTorchOpsError, from_torch

__all__ = ["from_torch", "UnsupportedTorchOpsError"]
