"""The lower-level search on a device mesh: preferences over `data`, the layer pool over `fsdp`.

The trainer's jitted `chunk(state, problems, data)` is vmapped over preferences (per_preference
mode: every leaf of the state and of the problems has a leading [N] axis), so placing those
leading axes on `data` and the pool / shells by the partition rules is all it takes: jit follows
the inputs' shardings, each device group runs its preferences' agents, and each fsdp group holds
a slice of the pool.

    state = trainer.init(key, problems)
    state, problems, data = place_search(mesh, state, problems, data)
    state, metrics = trainer.chunk(state, problems, data)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hm3jax.sharding import pool_shardings, replicated, rules_of, tree_shardings


def preference_shardings(tree: Any, mesh: Mesh, mesh_cfg=None) -> Any:
    """A sharding per leaf of `tree` whose leading axis is the preference axis: that axis on the mesh
    axis of the `preferences` rule (default data) where it divides evenly, else replicated."""
    axis = rules_of(mesh_cfg).get("preferences")
    n = mesh.shape[axis] if axis is not None else 1

    def one(x):
        shape = getattr(x, "shape", ())
        if not shape or n == 1 or shape[0] % n:
            return replicated(mesh)
        return NamedSharding(mesh, PartitionSpec(axis, *([None] * (len(shape) - 1))))

    return jax.tree.map(one, tree)


def search_data_shardings(data: Any, mesh: Mesh, mesh_cfg=None) -> Any:
    """Shardings of lower.SearchData: pool layers by the rules (pool axis whole), each preference's
    shell with its preference axis on `data` and its matrices FSDP, the batch and row index
    replicated (every preference scores the same rows), as are the alignment maps. The result is a
    SearchData of shardings (data's own type: this module sits below search.lower, which imports it)."""
    shells = tree_shardings(data.shells, mesh, mesh_cfg, stacked_axis="preferences")
    return data._replace(layers=pool_shardings(data.layers, mesh, mesh_cfg), shells=shells,
                         batch=jax.tree.map(lambda _: replicated(mesh), data.batch),
                         task_rows=replicated(mesh),
                         align=jax.tree.map(lambda _: replicated(mesh), data.align))


def place_search(mesh: Mesh, state: Any, problems: Any, data: Any, mesh_cfg=None) -> tuple[Any, Any, Any]:
    """(state, problems, data) moved onto `mesh`: the trainer state and problems split over the
    preference axis, SearchData by `search_data_shardings` (data=None, for scorers without data,
    stays None). Per_preference mode only: a conditioned agent's state has no preference axis."""
    state = jax.device_put(state, preference_shardings(state, mesh, mesh_cfg))
    problems = jax.device_put(problems, preference_shardings(problems, mesh, mesh_cfg))
    if data is not None:
        data = jax.device_put(data, search_data_shardings(data, mesh, mesh_cfg))
    return state, problems, data

