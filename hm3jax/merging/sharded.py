"""A merge whose outputs keep a given sharding: `merge_sharded` runs any merge method in one jit with
its outputs placed by a NamedSharding per leaf (e.g. `hm3jax.sharding.param_shardings` of the base).
It lives with the merge methods (it needs nothing of the mesh but the shardings it is given);
`hm3jax.sharding` re-exports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from hm3jax.merging.methods import get_method


def merge_sharded(method: Any, base: Any, models: Sequence[Any], weights: Any = None, key: Any = None, *,
                  shardings: Any, **params: Any) -> Any:
    """`method.merge(base, models, weights, key=key, **params)` in one jit whose outputs are placed by
    `shardings` (a NamedSharding per leaf, e.g. param_shardings of the base): the inputs keep their
    own shardings, and methods whose per-tensor reductions (slerp's norms, karcher's iterations)
    would otherwise leave the result replicated return it sharded. `method`: a MergeMethod or its
    name in merging.METHODS. Weights and parameters are closed over (concrete, as the methods'
    host-side preparation needs them)."""
    m = get_method(method) if isinstance(method, str) else method
    fn = jax.jit(lambda b, ms: m.merge(b, ms, weights, key=key, **params), out_shardings=shardings)
    return fn(base, list(models))
