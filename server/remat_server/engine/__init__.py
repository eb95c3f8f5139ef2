"""The engine: compile a request once (`compile`), keep it in a byte-bounded LRU
(`cache`), and run it (`run`: `Engine`)."""

from remat_proto.results import Metrics

from .cache import LRUCache
from .checks import max_abs_diff
from .compile import Compiled, CompileKey, Planned
from .run import Engine, Plan, RunRequest, RunResult

__all__ = [
    "Compiled",
    "CompileKey",
    "Engine",
    "LRUCache",
    "Metrics",
    "Plan",
    "Planned",
    "RunRequest",
    "RunResult",
    "max_abs_diff",
]
