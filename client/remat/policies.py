"""Store-versus-recompute policies, chosen per request.

    >>> from remat import policies
    >>> policies.StoreAll()
    StoreAll()
    >>> policies.resolve("store_all")
    StoreAll()
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreAll:
    """Keep every value the backward pass needs: fastest, most memory."""

    name = "store_all"


Policy = StoreAll
_BY_NAME = {"store_all": StoreAll}


def resolve(policy: "Policy | str | None") -> Policy:
    """A policy object from an object, a name, or None (the server's default)."""
    if policy is None:
        return StoreAll()
    if isinstance(policy, str):
        if policy not in _BY_NAME:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(_BY_NAME))}")
        return _BY_NAME[policy]()
    if isinstance(policy, tuple(_BY_NAME.values())):
        return policy
    raise TypeError(f"expected a remat.policies object or name, got {type(policy).__name__}")
