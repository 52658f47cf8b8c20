"""The registry of merge methods by name (what a recipe's `merge_method` selects).

Families live in task_arithmetic.py (task_arithmetic, ties, dare_*, breadcrumbs*, della*),
averaging.py (linear, model_stock, sce, passthrough), spherical.py (slerp, nuslerp, multislerp,
karcher) and selective.py (arcee_fusion, nearswap, ram, ramplus_tl).
"""

from __future__ import annotations

from collections.abc import Mapping

from hm3jax.merging import averaging, selective, spherical
from hm3jax.merging import task_arithmetic as ta
from hm3jax.merging.base import MergeMethod

_ALL = (*ta.METHODS, averaging.linear, averaging.model_stock, averaging.sce, averaging.passthrough,
        spherical.slerp, spherical.nuslerp, spherical.multislerp, spherical.karcher, *selective.METHODS)

METHODS: Mapping[str, MergeMethod] = {m.name: m for m in _ALL}


class UnknownMethodError(ValueError):
    """A merge method name that is not registered."""


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; UnknownMethodError listing the supported names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown merge method {name!r}; supported: {', '.join(sorted(METHODS))}") from None


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (for recipes); a name that is taken raises ValueError."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    dict.__setitem__(METHODS, method.name, method)  # METHODS is typed read-only for callers
    return method
