"""Store-versus-recompute policies: small frozen values (JAX's ad_checkpoint style),
each defined once, here, for the SDK and the server alike.

A policy decides which forward values the backward pass keeps and which it
recomputes from kept ones. Every policy computes bit-identical gradients; they differ
only in peak memory and time.

    >>> resolve("sqrt"), parse("every_k:4"), parse("save_ops:matmul,conv2d")
    (Sqrt(), EveryK(k=4), SaveOps(ops=('matmul', 'conv2d')))
    >>> label(Revolve(slots=3)), label(Budget(bytes=2 << 30, profile=True))
    ('revolve(3)', 'budget(2GiB,profile)')

`KINDS` is the one table: for each policy its wire kind (the field of the `Policy`
oneof in executor.proto, also its name on the command line), its string form, how to
parse that form's parameter, its label, and any field named differently on the wire.
Adding a policy means a message in the .proto, a planner on the server and one row
here; `remat_proto.wire` maps every row to and from protobuf generically.

Constructors check what can be checked without a graph (`EveryK(0)` raises
ValueError); what only the server can check (a checkpoint name that is not a node)
comes back as an INVALID_ARGUMENT error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .units import UNITS, short_size, split_size

__all__ = [
    "StoreAll",
    "RecomputeAll",
    "EveryK",
    "Sqrt",
    "Checkpoints",
    "SaveOps",
    "Revolve",
    "Budget",
    "Optimal",
    "DTR",
    "Auto",
    "MinMemory",
    "Policy",
    "KINDS",
    "BUDGETED",
    "resolve",
    "parse",
    "label",
    "kind_of",
    "FORMS",
]


@dataclass(frozen=True)
class StoreAll:
    """Keep every forward value the backward pass reads. No recomputation: the
    fastest policy and the one with the highest peak memory (the baseline)."""


@dataclass(frozen=True)
class RecomputeAll:
    """Keep only the graph inputs; recompute every forward value from them whenever
    the backward pass reads it, then drop it. Low peak memory (MinMemory may go lower);
    the recompute cost grows with depth (quadratically on a chain)."""


@dataclass(frozen=True)
class EveryK:
    """Keep every k-th checkpoint candidate (segment boundary) in forward order and
    recompute the segments in between during the backward pass: about one extra
    forward pass; larger k means less memory kept but longer segments live at once."""

    k: int

    def __post_init__(self):
        _check_count("EveryK", "k", self.k)


@dataclass(frozen=True)
class Sqrt:
    """Chen et al. 2016: about sqrt(n) segments of about sqrt(n) boundaries each, so
    O(sqrt(n)) memory for one extra forward pass."""


@dataclass(frozen=True)
class Checkpoints:
    """Keep exactly the named forward nodes (plus the inputs) and recompute the rest.
    A name that is not a forward node is rejected by the server."""

    names: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "names", _check_names("Checkpoints", "names", self.names))


@dataclass(frozen=True)
class SaveOps:
    """JAX-style save policy: keep the outputs of the listed op kinds (e.g. "matmul",
    "conv2d": the expensive ones) and recompute the cheap rest."""

    ops: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "ops", _check_names("SaveOps", "ops", self.ops))


@dataclass(frozen=True)
class Revolve:
    """Griewank-Walther binomial checkpointing with `slots` snapshots (the initial
    state included) over the chain of segments between the forward graph's
    articulation points: the fewest recomputations possible for that memory. The
    graph must have a chain structure."""

    slots: int

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
        if self.bytes < 0:
            raise ValueError(f"{kind}: bytes must be > 0, got {self.bytes}")
        if self.bytes >= 2**63:
            raise ValueError(f"{kind}: bytes must fit an int64, got {self.bytes}")
        if not 0 <= self.fraction <= 1:  # NaN too
            raise ValueError(
                f"{kind}: fraction must be in (0, 1] (of store_all's peak), got {self.fraction}"
            )
        if (self.bytes > 0) == (self.fraction > 0):
            raise ValueError(
                f"{kind}: give exactly one of bytes and fraction (bytes > 0 or "
                f"a fraction in (0, 1]), got bytes={self.bytes}, "
                f"fraction={self.fraction}"
            )


@dataclass(frozen=True)
class Budget(_Budgeted):
    """The least recomputation whose peak memory fits a budget, on any graph: `bytes`,
    or `fraction` of store_all's peak. Recomputation is priced in FLOPs, or, with
    `profile=True`, in op times measured by a timed forward pass on the server (on
    the first Run's inputs; the plan is then cached like any other).

        >>> Budget(fraction=0.5)
        Budget(bytes=0, fraction=0.5, profile=False)
        >>> Budget(bytes=2 << 30)
        Budget(bytes=2147483648, fraction=0.0, profile=False)
    """

    bytes: int = 0
    fraction: float = 0.0
    profile: bool = False


@dataclass(frozen=True)
class Optimal(_Budgeted):
    """The exact optimum (Checkmate's MILP, solved with HiGHS) under a budget, within
    `time_limit` seconds (0: the server's default, which is also the most it grants).
    For graphs up to a few hundred nodes; larger ones fall back to Budget, as the
    plan's `planner` report says."""

    bytes: int = 0
    fraction: float = 0.0
    time_limit: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_time_limit("Optimal", self.time_limit)


def _check_time_limit(cls: str, value) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= value < math.inf
    ):  # HiGHS would run unbounded
        raise ValueError(
            f"{cls}: time_limit must be finite and >= 0, in seconds "
            f"(0: the server's --optimal-time-limit), got {value!r}"
        )


@dataclass(frozen=True)
class MinMemory:
    """The schedule with the lowest peak memory, and among those the least
    recomputation found: for "fit it at all", when no budget is known. On joint graphs
    the exact MILP takes (the server's --optimal-max-nodes) it searches for the proven
    minimum within `time_limit` seconds (0: the server's --optimal-time-limit); the
    plan's `planner` report says whether the peak is proven minimal, else the proven
    bound no schedule can go under.

        >>> MinMemory()
        MinMemory(time_limit=0.0)
    """

    time_limit: float = 0.0

    def __post_init__(self):
        _check_time_limit("MinMemory", self.time_limit)


@dataclass(frozen=True)
class DTR(_Budgeted):
    """Dynamic Tensor Rematerialization (Kirisame et al. 2021): evict the value with
    the least cost / (size x staleness) whenever the budget is hit, simulated on the
    server into a static schedule."""

    bytes: int = 0
    fraction: float = 0.0


@dataclass(frozen=True)
class Auto:
    """The default: store_all when it fits `bytes` (0: the server's per-request
    limit), else the cheapest plan that fits; the server answers RESOURCE_EXHAUSTED,
    naming the least memory a schedule needs, when nothing does."""

    bytes: int = 0

    def __post_init__(self):
        if (
            isinstance(self.bytes, bool)
            or not isinstance(self.bytes, int)
            or not 0 <= self.bytes < 2**63
        ):
            raise ValueError(f"Auto: bytes must be an int >= 0, got {self.bytes!r}")


_DEFAULT = Auto()  # what no policy means (policies are immutable: one object serves all)

Policy = (
    StoreAll
    | RecomputeAll
    | EveryK
    | Sqrt
    | Checkpoints
    | SaveOps
    | Revolve
    | Budget
    | Optimal
    | DTR
    | Auto
    | MinMemory
)
BUDGETED = (Budget, Optimal, DTR)


# --- parameters of the string forms -----------------------------------------------------
def _check_count(cls: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}: {name} must be an int, got {value!r}")
    if not 1 <= value < 2**31:  # an int32 on the wire
        raise ValueError(f"{cls}: {name} must be >= 1 (and below 2**31), got {value}")


def _check_names(cls: str, name: str, values) -> tuple[str, ...]:
    if isinstance(values, str):  # one name, not its characters
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{cls}: {name} must be a tuple of strings, got {values!r}") from None
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"{cls}: every entry of {name} must be a non-empty string, got {value!r}"
            )
    return values


def _integer(cls: type, usage: str) -> Callable[[str], Policy]:
    def parse_integer(text: str) -> Policy:
        try:
            return cls(int(text))
        except ValueError:
            if text.lstrip("+-").isdigit():
                raise
            raise ValueError(f"{text!r} is not an integer; expected {usage}") from None

    return parse_integer


def _names(cls: type, usage: str) -> Callable[[str], Policy]:
    def parse_names(text: str) -> Policy:
        names = tuple(part.strip() for part in text.split(","))
        if not all(names):
            raise ValueError(f"empty name in {text!r}; expected {usage}")
        return cls(names)

    return parse_names


def _budget(cls: type, usage: str) -> Callable[[str], Policy]:
    """ "0.5" -> fraction 0.5; "2GiB", "512MiB", "1000000B" -> bytes."""

    def parse_budget(text: str) -> Policy:
        parts = split_size(text)
        if parts is None:
            raise ValueError(f"{text!r} is not a fraction or a size; expected {usage}")
        number, unit = parts
        if not unit:  # a bare number is a fraction; bytes carry a unit (B, KiB, MiB, GiB...)
            if not 0 < number <= 1:
                raise ValueError(
                    f"a bare number is a fraction of store_all's peak in "
                    f"(0, 1], got {text!r}; give bytes with a unit, e.g. "
                    "512MiB or 2GiB"
                )
            return cls(fraction=number)
        return cls(bytes=int(number * UNITS[unit]))

    return parse_budget


def _amount(policy) -> str:
    return f"{policy.fraction:g}" if policy.fraction else short_size(policy.bytes)


# --- the table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One policy: `name` is its wire kind and command-line keyword; `usage` its string
    form with a parameter ("" if it takes none); `parse` reads the parameter; `label`
    is its short name in metrics and tables; `wire_names` maps fields named
    differently in the .proto."""

    cls: type
    name: str
    label: Callable[[Policy], str]
    usage: str = ""
    parse: Callable[[str], Policy] | None = None
    wire_names: dict[str, str] = field(default_factory=dict)


def _kinds(*rows: Kind) -> dict[type, Kind]:
    return {row.cls: row for row in rows}


_U = {  # the string forms, each written once
    "every_k": "every_k:K (e.g. every_k:4)",
    "revolve": "revolve:SLOTS (e.g. revolve:4)",
    "save_ops": "save_ops:OP[,OP...] (e.g. save_ops:matmul,conv2d)",
    "checkpoints": "checkpoints:NODE[,NODE...] (e.g. checkpoints:act3,act7)",
    "budget": "budget:FRACTION|SIZE (e.g. budget:0.5, budget:2GiB)",
    "optimal": "optimal:FRACTION|SIZE (e.g. optimal:0.3)",
    "dtr": "dtr:FRACTION|SIZE (e.g. dtr:0.5)",
}
KINDS = _kinds(
    Kind(StoreAll, "store_all", lambda p: "store_all"),
    Kind(RecomputeAll, "recompute_all", lambda p: "recompute_all"),
    Kind(Sqrt, "sqrt", lambda p: "sqrt"),
    Kind(Auto, "auto", lambda p: f"auto({short_size(p.bytes)})" if p.bytes else "auto"),
    Kind(
        EveryK,
        "every_k",
        lambda p: f"every_k({p.k})",
        _U["every_k"],
        _integer(EveryK, _U["every_k"]),
    ),
    Kind(
        Revolve,
        "revolve",
        lambda p: f"revolve({p.slots})",
        _U["revolve"],
        _integer(Revolve, _U["revolve"]),
    ),
    Kind(
        SaveOps,
        "save_ops",
        lambda p: f"save_ops({','.join(p.ops)})",
        _U["save_ops"],
        _names(SaveOps, _U["save_ops"]),
    ),
    Kind(
        Checkpoints,
        "checkpoints",
        lambda p: f"checkpoints({','.join(p.names)})",
        _U["checkpoints"],
        _names(Checkpoints, _U["checkpoints"]),
    ),
    Kind(
        Budget,
        "budget",
        lambda p: f"budget({_amount(p)}{',profile' if p.profile else ''})",
        _U["budget"],
        _budget(Budget, _U["budget"]),
    ),
    Kind(
        Optimal,
        "optimal",
        lambda p: f"optimal({_amount(p)})",
        _U["optimal"],
        _budget(Optimal, _U["optimal"]),
        wire_names={"time_limit": "time_limit_seconds"},
    ),
    Kind(DTR, "dtr", lambda p: f"dtr({_amount(p)})", _U["dtr"], _budget(DTR, _U["dtr"])),
    Kind(
        MinMemory,
        "min_memory",
        lambda p: "min_memory",
        wire_names={"time_limit": "time_limit_seconds"},
    ),
)
BY_NAME = {kind.name: kind for kind in KINDS.values()}
for _kind in KINDS.values():  # `EveryK(4).name == "every_k"`, read off the table
    _kind.cls.name = _kind.name
PARAMETERLESS = {kind.name: kind.cls for kind in KINDS.values() if kind.parse is None}
# What `parse` accepts, for help texts.
FORMS = tuple(kind.usage or kind.name for kind in KINDS.values())


def kind_of(policy: Policy) -> Kind:
    """The table row of a policy object; TypeError for anything else."""
    kind = KINDS.get(type(policy))
    if kind is None:
        raise TypeError(f"expected a remat.policies object or name, got {type(policy).__name__}")
    return kind


def resolve(policy: Policy | str | None) -> Policy:
    """A policy object from an object, the name of a parameterless policy
    ("store_all", "recompute_all", "sqrt", "auto"), the command line's KIND:PARAMETER
    form (see `parse`), or None (auto, the server's default).

        >>> resolve(None), resolve("recompute_all"), resolve(EveryK(2))
        (Auto(bytes=0), RecomputeAll(), EveryK(k=2))
        >>> resolve("dtr:0.5")
        DTR(bytes=0, fraction=0.5)
    """
    if policy is None:
        return _DEFAULT
    if isinstance(policy, str):
        if ":" in policy:
            return parse(policy)
        if policy in PARAMETERLESS:
            return PARAMETERLESS[policy]()
        if policy in BY_NAME:
            raise ValueError(
                f"policy {policy!r} takes a parameter: pass a policy object "
                f"or parse the string form {BY_NAME[policy].usage}"
            )
        raise ValueError(
            f"unknown policy {policy!r}; by name: {', '.join(PARAMETERLESS)} "
            f"(the others take parameters: "
            f"{', '.join(n for n in BY_NAME if n not in PARAMETERLESS)})"
        )
    kind_of(policy)
    return policy


def parse(text: str) -> Policy:
    """A policy from its command-line form: a parameterless name, or KIND:PARAMETER.

    >>> parse("sqrt"), parse("revolve:3"), parse("checkpoints:act3,act7")
    (Sqrt(), Revolve(slots=3), Checkpoints(names=('act3', 'act7')))
    >>> parse("budget:2GiB")
    Budget(bytes=2147483648, fraction=0.0, profile=False)
    >>> parse("every_k")
    Traceback (most recent call last):
    ...
    ValueError: policy 'every_k' needs a parameter: every_k:K (e.g. every_k:4)
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a policy string, got {type(text).__name__}")
    name, colon, argument = text.strip().partition(":")
    name, argument = name.strip().lower().replace("-", "_"), argument.strip()
    kind = BY_NAME.get(name)
    if kind is None:
        raise ValueError(f"unknown policy {text!r}; expected one of: {', '.join(FORMS)}")
    if kind.parse is None:
        if colon:
            raise ValueError(f"policy '{name}' takes no parameter, got {text!r}")
        return kind.cls()
    if not argument:
        raise ValueError(f"policy '{name}' needs a parameter: {kind.usage}")
    try:
        return kind.parse(argument)
    except (TypeError, ValueError) as error:
        raise ValueError(f"policy '{name}': {error}") from None


def label(policy: Policy | str | None) -> str:
    """A short, stable name for metrics and tables: "sqrt", "every_k(4)", "revolve(3)",
    "save_ops(matmul)", "checkpoints(act3,act7)", "budget(0.5)", "optimal(2GiB)"."""
    policy = resolve(policy)
    return KINDS[type(policy)].label(policy)
