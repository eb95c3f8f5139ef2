"""Store-versus-recompute policies, chosen per request.

A policy decides which forward values the backward pass keeps and which it
recomputes from kept ones. Every policy computes bit-identical gradients; they differ
only in peak memory and time. Pass an object, or a parameterless policy's name, as
`policy=` to `Client.run`, `Client.plan` and `Client.compare`:

    >>> from remat import policies
    >>> policies.resolve("sqrt")
    Sqrt()
    >>> policies.parse("every_k:4"), policies.parse("save_ops:matmul,conv2d")
    (EveryK(k=4), SaveOps(ops=('matmul', 'conv2d')))
    >>> policies.label(policies.Revolve(slots=3))
    'revolve(3)'

Obvious misuse fails here, before anything is sent (`EveryK(0)` raises ValueError);
what only the server can check (a checkpoint name that is not a node, an unknown op,
Revolve on a graph without a chain) raises `remat.InvalidArgumentError`, itself a
ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = [
    "StoreAll", "RecomputeAll", "EveryK", "Sqrt", "Checkpoints", "SaveOps", "Revolve",
    "Budget", "Optimal", "DTR", "Auto", "Policy", "resolve", "parse", "label",
]


@dataclass(frozen=True)
class StoreAll:
    """Keep every forward value the backward pass reads. No recomputation: the
    fastest policy and the one with the highest peak memory (the baseline)."""

    name = "store_all"


@dataclass(frozen=True)
class RecomputeAll:
    """Keep only the graph inputs; recompute every forward value from them whenever
    the backward pass reads it, then drop it. The lowest peak memory; the recompute
    cost grows with depth (quadratically on a chain)."""

    name = "recompute_all"


@dataclass(frozen=True)
class EveryK:
    """Keep every k-th checkpoint candidate (segment boundary) in forward order and
    recompute the segments in between during the backward pass: about one extra
    forward pass; larger k means less memory kept but longer segments live at once."""

    k: int
    name = "every_k"

    def __post_init__(self):
        _check_count("EveryK", "k", self.k)


@dataclass(frozen=True)
class Sqrt:
    """Chen et al. 2016: about sqrt(n) segments of about sqrt(n) boundaries each, so
    O(sqrt(n)) memory for one extra forward pass."""

    name = "sqrt"


@dataclass(frozen=True)
class Checkpoints:
    """Keep exactly the named forward nodes (plus the inputs) and recompute the rest.
    A name that is not a forward node is rejected by the server."""

    names: tuple[str, ...]
    name = "checkpoints"

    def __post_init__(self):
        object.__setattr__(self, "names", _check_names("Checkpoints", "names", self.names))


@dataclass(frozen=True)
class SaveOps:
    """JAX-style save policy: keep the outputs of the listed op kinds (e.g. "matmul",
    "conv2d": the expensive ones) and recompute the cheap rest."""

    ops: tuple[str, ...]
    name = "save_ops"

    def __post_init__(self):
        object.__setattr__(self, "ops", _check_names("SaveOps", "ops", self.ops))


@dataclass(frozen=True)
class Revolve:
    """Griewank-Walther binomial checkpointing with `slots` snapshots (the initial
    state included) over the chain of segments between the forward graph's
    articulation points: the fewest recomputations possible for that memory. The
    graph must have a chain structure."""

    slots: int
    name = "revolve"

    def __post_init__(self):
        _check_count("Revolve", "slots", self.slots)


class _Budgeted:
    """A byte budget: exactly one of `bytes` (> 0) and `fraction` (of store_all's
    peak, in (0, 1]) is set."""

    def __post_init__(self):
        kind = type(self).__name__
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int):
            raise TypeError(f"{kind}: bytes must be an int, got {self.bytes!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
            raise TypeError(f"{kind}: fraction must be a number, got {self.fraction!r}")
        if (self.bytes > 0) == (self.fraction > 0) or self.bytes < 0 or self.fraction < 0:
            raise ValueError(f"{kind}: give exactly one of bytes > 0 and fraction > 0, got "
                             f"bytes={self.bytes}, fraction={self.fraction}")
        if self.fraction > 1:
            raise ValueError(f"{kind}: fraction is of store_all's peak and must be <= 1, "
                             f"got {self.fraction}")
        if self.bytes >= 2 ** 63:
            raise ValueError(f"{kind}: bytes must fit an int64, got {self.bytes}")


@dataclass(frozen=True)
class Budget(_Budgeted):
    """The least recomputation whose peak memory fits a budget, on any graph: `bytes`,
    or `fraction` of store_all's peak. Recomputation is priced in FLOPs, or, with
    `profile=True`, in op times measured by a timed forward pass on the server.

        >>> Budget(fraction=0.5), Budget(bytes=2 << 30)
        (Budget(bytes=0, fraction=0.5, profile=False), Budget(bytes=2147483648, fraction=0.0, profile=False))
    """

    bytes: int = 0
    fraction: float = 0.0
    profile: bool = False
    name = "budget"


@dataclass(frozen=True)
class Optimal(_Budgeted):
    """The exact optimum (Checkmate's MILP, solved with HiGHS) under a budget, within
    `time_limit` seconds (0: the server's default). For graphs up to a few hundred
    nodes; larger ones fall back to Budget, as the plan's `planner` report says."""

    bytes: int = 0
    fraction: float = 0.0
    time_limit: float = 0.0
    name = "optimal"


@dataclass(frozen=True)
class DTR(_Budgeted):
    """Dynamic Tensor Rematerialization (Kirisame et al. 2021): evict the value with
    the least cost / (size x staleness) whenever the budget is hit, simulated on the
    server into a static schedule."""

    bytes: int = 0
    fraction: float = 0.0
    name = "dtr"


@dataclass(frozen=True)
class Auto:
    """The default: store_all when it fits `bytes` (0: the server's per-request
    limit), else the cheapest plan that fits; the server answers RESOURCE_EXHAUSTED,
    with the lowest predicted peak, when nothing does."""

    bytes: int = 0
    name = "auto"

    def __post_init__(self):
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise ValueError(f"Auto: bytes must be an int >= 0, got {self.bytes!r}")


Policy = Union[StoreAll, RecomputeAll, EveryK, Sqrt, Checkpoints, SaveOps, Revolve, Budget,
               Optimal, DTR, Auto]
_TYPES = (StoreAll, RecomputeAll, EveryK, Sqrt, Checkpoints, SaveOps, Revolve, Budget, Optimal,
          DTR, Auto)
_BY_NAME = {"store_all": StoreAll, "recompute_all": RecomputeAll, "sqrt": Sqrt, "auto": Auto}
_PARAMETERIZED = {"every_k": "every_k:K (e.g. every_k:4)", "revolve": "revolve:SLOTS (e.g. revolve:4)",
                  "save_ops": "save_ops:OP[,OP...] (e.g. save_ops:matmul,conv2d)",
                  "checkpoints": "checkpoints:NODE[,NODE...] (e.g. checkpoints:act3,act7)",
                  "budget": "budget:FRACTION|SIZE (e.g. budget:0.5, budget:2GiB)",
                  "optimal": "optimal:FRACTION|SIZE (e.g. optimal:0.3)",
                  "dtr": "dtr:FRACTION|SIZE (e.g. dtr:0.5)"}
_BUDGETED = {"budget": Budget, "optimal": Optimal, "dtr": DTR}
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10 ** 3,
          "mb": 10 ** 6, "gb": 10 ** 9}
FORMS = (*_BY_NAME, *_PARAMETERIZED.values())  # what `parse` accepts, for help texts


def _check_count(cls: str, field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}: {field} must be an int, got {value!r}")
    if not 1 <= value < 2 ** 31:  # an int32 on the wire
        raise ValueError(f"{cls}: {field} must be >= 1 (and below 2**31), got {value}")


def _check_names(cls: str, field: str, values) -> tuple[str, ...]:
    if isinstance(values, str):  # one name, not its characters
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{cls}: {field} must be a tuple of strings, got {values!r}") from None
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{cls}: every entry of {field} must be a non-empty string, "
                             f"got {value!r}")
    return values


def resolve(policy: "Policy | str | None") -> Policy:
    """A policy object from an object, the name of a parameterless policy
    ("store_all", "recompute_all", "sqrt", "auto"), or None (auto, the server's default).

        >>> resolve(None), resolve("recompute_all"), resolve(EveryK(2))
        (Auto(bytes=0), RecomputeAll(), EveryK(k=2))
    """
    if policy is None:
        return Auto()
    if isinstance(policy, str):
        if policy in _BY_NAME:
            return _BY_NAME[policy]()
        if policy in _PARAMETERIZED:
            raise ValueError(f"policy {policy!r} takes a parameter: pass a remat.policies "
                             f"object or parse the string form {_PARAMETERIZED[policy]}")
        raise ValueError(f"unknown policy {policy!r}; by name: {', '.join(_BY_NAME)} "
                         f"(the others take parameters: {', '.join(_PARAMETERIZED)})")
    if isinstance(policy, _TYPES):
        return policy
    raise TypeError(f"expected a remat.policies object or name, got {type(policy).__name__}")


def parse(text: str) -> Policy:
    """A policy from its command-line form: a parameterless name, or KIND:PARAMETER.

        >>> parse("sqrt"), parse("revolve:3"), parse("checkpoints:act3,act7")
        (Sqrt(), Revolve(slots=3), Checkpoints(names=('act3', 'act7')))
        >>> parse("every_k")
        Traceback (most recent call last):
        ...
        ValueError: policy 'every_k' needs a parameter: every_k:K (e.g. every_k:4)
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a policy string, got {type(text).__name__}")
    kind, colon, argument = text.strip().partition(":")
    kind, argument = kind.strip().lower().replace("-", "_"), argument.strip()
    if kind in _BY_NAME:
        if colon:
            raise ValueError(f"policy '{kind}' takes no parameter, got {text!r}")
        return _BY_NAME[kind]()
    if kind not in _PARAMETERIZED:
        raise ValueError(f"unknown policy {text!r}; expected one of: {', '.join(FORMS)}")
    if not argument:
        raise ValueError(f"policy '{kind}' needs a parameter: {_PARAMETERIZED[kind]}")
    if kind in _BUDGETED:
        return _BUDGETED[kind](**_budget_argument(kind, argument))
    if kind in ("every_k", "revolve"):
        try:
            number = int(argument)
        except ValueError:
            raise ValueError(f"policy '{kind}': {argument!r} is not an integer; "
                             f"expected {_PARAMETERIZED[kind]}") from None
        return EveryK(number) if kind == "every_k" else Revolve(number)
    names = tuple(part.strip() for part in argument.split(","))
    if not all(names):
        raise ValueError(f"policy '{kind}': empty name in {argument!r}; "
                         f"expected {_PARAMETERIZED[kind]}")
    return SaveOps(names) if kind == "save_ops" else Checkpoints(names)


def _budget_argument(kind: str, text: str) -> dict:
    """"0.5" -> fraction 0.5; "2GiB", "512MiB", "1000000" -> bytes."""
    import re

    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text.lower())
    if not match or (match.group(2) and match.group(2) not in _UNITS):
        raise ValueError(f"policy '{kind}': {text!r} is not a fraction or a size; "
                         f"expected {_PARAMETERIZED[kind]}")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:  # a bare number is a fraction; bytes carry a unit (B, KiB, MiB, GiB...)
        if not 0 < number <= 1:
            raise ValueError(f"policy '{kind}': a bare number is a fraction of store_all's "
                             f"peak in (0, 1], got {text!r}; give bytes with a unit, "
                             "e.g. 512MiB or 2GiB")
        return {"fraction": number}
    return {"bytes": int(number * _UNITS[unit])}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n}B"


def label(policy: "Policy | str | None") -> str:
    """A short name for tables, like the server's `Metrics.policy`: "sqrt",
    "every_k(4)", "revolve(3)", "save_ops(matmul)", "checkpoints(act3,act7)"."""
    policy = resolve(policy)
    if isinstance(policy, EveryK):
        return f"every_k({policy.k})"
    if isinstance(policy, Revolve):
        return f"revolve({policy.slots})"
    if isinstance(policy, SaveOps):
        return f"save_ops({','.join(policy.ops)})"
    if isinstance(policy, Checkpoints):
        return f"checkpoints({','.join(policy.names)})"
    if isinstance(policy, _Budgeted):
        amount = f"{policy.fraction:g}" if policy.fraction else _size(policy.bytes)
        extra = ",profile" if getattr(policy, "profile", False) else ""
        return f"{policy.name}({amount}{extra})"
    if isinstance(policy, Auto) and policy.bytes:
        return f"auto({_size(policy.bytes)})"
    return policy.name
