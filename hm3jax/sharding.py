"""One device mesh from config, and logical-axis rules that place every array on it.

The mesh has two axes: `data` (candidate paths, examples, preferences: work that splits without
communication) and `fsdp` (parameters: each device holds a slice of every weight, gathered one
layer at a time where a matmul needs it). Sizes come from `MeshConfig`; -1 takes the devices left.

Placement is two tables, as in maxtext. `PARAM_AXES` names each dimension of a params-layout leaf
(models/params.py) with a *logical* axis (`vocab`, `embed`, `heads`, `mlp`, `norm`, plus `layers`
for the stacked layer axis or `pool` for a LayerPool's); `LOGICAL_RULES` maps logical axes to mesh
axes (`embed -> fsdp`: FSDP over the hidden dimension; `paths`/`batch`/`preferences -> data`).
A leaf no rule matches is an error naming it (or replicated, where the caller asks: agents,
optimiser counters). A dimension the mesh axis does not divide evenly is replicated.

    mesh = make_mesh(MeshConfig(fsdp=-1))
    params = jax.device_put(params, param_shardings(params, mesh))
    paths = jax.device_put(paths, batch_sharding(mesh, paths.ndim, "paths"))

`merge_sharded` (a merge whose outputs keep these shardings) lives in hm3jax.merging.sharded and is
re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hm3jax.merging.leaves import path_names
from hm3jax.merging.sharded import merge_sharded  # noqa: F401  (re-exported: its home is hm3jax.merging)
from hm3jax.settings import DATA, FSDP, LOGICAL_RULES, MESH_AXES, MeshConfig, ShardingError  # noqa: F401

# Path regex (leaf keys joined by "/") -> logical names of the per-layer dimensions. Matched as a
# suffix, so the same table places optimiser states (`.../mu/layers/mlp/up_proj/weight`).
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(^|/)(embed_tokens|lm_head)/weight$", ("vocab", "embed")),
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm)/weight$", ("norm",)),
    (r"(^|/)[qkv]_proj/weight$", ("heads", "embed")),
    (r"(^|/)[qkv]_proj/bias$", ("heads",)),
    (r"(^|/)o_proj/weight$", ("embed", "heads")),
    (r"(^|/)(gate|up)_proj/weight$", ("mlp", "embed")),
    (r"(^|/)(gate|up)_proj/bias$", ("mlp",)),
    (r"(^|/)down_proj/weight$", ("embed", "mlp")),
    (r"(^|/)down_proj/bias$", ("norm",)),
)




def initialize_distributed(cfg: MeshConfig) -> bool:
    """Call `jax.distributed.initialize()` when `cfg.distributed`; True if it was called. Must run
    before anything queries devices (make_mesh does it first)."""
    if not cfg.distributed:
        return False
    kwargs: dict[str, Any] = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)
    return True


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for `n_devices`, -1 resolved; ShardingError when they do not fit."""
    cfg.check()
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1:
        data = n_devices // fsdp
    if fsdp == -1:
        fsdp = n_devices // data
    if data < 1 or fsdp < 1 or data * fsdp > n_devices:
        raise ShardingError(f"mesh.data {cfg.data} x mesh.fsdp {cfg.fsdp} needs {max(data, 1) * max(fsdp, 1)} "
                            f"devices; {n_devices} are visible")
    if cfg.slices > 1 and data % cfg.slices:
        raise ShardingError(f"mesh.data {data} is not a multiple of mesh.slices {cfg.slices}")
    return data, fsdp


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp) Mesh of `cfg` over `devices` (default: all, after initialize_distributed).

    Fewer devices than visible: the first data*fsdp are used (the default config: one device).
    With `slices > 1` the data axis is laid across slices (mesh_utils.create_hybrid_device_mesh).
    """
    initialize_distributed(cfg)
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(cfg, len(devices))
    if cfg.slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh((data // cfg.slices, fsdp), (cfg.slices, 1), devices)
    elif data * fsdp == len(devices):
        try:
            grid = mesh_utils.create_device_mesh((data, fsdp), devices)
        except (ValueError, NotImplementedError, AssertionError):  # a topology it cannot lay out
            grid = np.asarray(devices).reshape(data, fsdp)
    else:
        grid = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


# ------------------------------------------------------------------------------------ rules
def rules_of(cfg: MeshConfig | None = None) -> dict[str, str | None]:
    """LOGICAL_RULES with `cfg.rules` applied: logical axis -> mesh axis or None."""
    rules = dict(LOGICAL_RULES)
    for k, v in (cfg.rules if cfg is not None else {}).items():
        rules[k] = None if v == "none" else v
    return rules


def leaf_axes(name: str, ndim: int, stacked_axis: str = "layers") -> tuple[str, ...] | None:
    """Logical axes of a params-layout leaf named `name` ("layers/mlp/up_proj/weight"), or None when
    no PARAM_AXES entry matches. A leaf with one more dimension than its entry gets `stacked_axis`
    first (the layer axis of params, the pool axis of a LayerPool); more than one more: `models`
    too (a stack of several models' params)."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            extra = ndim - len(axes)
            if extra < 0:
                return None
            return (("models",) * (extra - 1) + (stacked_axis,) if extra else ()) + axes
    return None


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: dict[str, str | None]) -> PartitionSpec:
    """PartitionSpec of logical `axes`: each mapped by `rules`, replicated where the mesh axis is
    size 1, does not divide the dimension, or is already used by an earlier dimension."""
    used, out = set(), []
    for ax, n in zip(axes, shape):
        m = rules.get(ax) if ax is not None else None
        if m is None or m in used or mesh.shape[m] == 1 or n % mesh.shape[m]:
            out.append(None)
        else:
            used.add(m)
            out.append(m)
    return PartitionSpec(*out)


def _name(path) -> str:
    return "/".join(path_names(path))


def tree_shardings(tree: Any, mesh: Mesh, cfg: MeshConfig | None = None, stacked_axis: str = "layers",
                   unmatched: str = "error") -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs, any pytree), by PARAM_AXES
    and the rules. unmatched: "error" (ShardingError naming the leaf) or "replicate" (agents,
    optimiser counters, anything not in the params layout)."""
    rules = rules_of(cfg)

    def one(path, leaf):
        name, shape = _name(path), tuple(np.shape(leaf))
        axes = leaf_axes(name, len(shape), stacked_axis)
        if axes is None:
            if unmatched == "replicate" or not shape:
                return NamedSharding(mesh, PartitionSpec())
            raise ShardingError(f"no partition rule places leaf {name!r} (shape {list(shape)}); "
                                "add a PARAM_AXES entry or pass unmatched='replicate'")
        return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(params: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """Shardings of a params pytree (models/params.py layout; layer axis first, never split)."""
    return tree_shardings(params, mesh, cfg, "layers")


def pool_shardings(layers: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """Shardings of a LayerPool's `layers` (pool axis first, never split: a path step slices locally)."""
    return tree_shardings(layers, mesh, cfg, "pool")


def opt_state_shardings(state: Any, mesh: Mesh, cfg: MeshConfig | None = None) -> Any:
    """Shardings of an optax state over params: moments like their params, the rest replicated."""
    return tree_shardings(state, mesh, cfg, "layers", unmatched="replicate")


def batch_sharding(mesh: Mesh, ndim: int, logical: str = "batch", cfg: MeshConfig | None = None) -> NamedSharding:
    """Sharding of an array whose leading axis is `logical` (batch, paths, preferences): split over
    the axis its rule names, the other `ndim - 1` dimensions replicated."""
    m = rules_of(cfg).get(logical)
    lead = m if m is not None and mesh.shape[m] > 1 else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_tree(tree: Any, shardings: Any) -> Any:
    """`tree` placed by `shardings` (one device_put for the whole pytree)."""
    return jax.device_put(tree, shardings)
