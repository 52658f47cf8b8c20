"""LayerPool: the layers of several same-width models stacked into one pytree.

A pool holds every decoder layer of a list of models on one leading axis, so a *path* through the
pool (which layer runs at each step) is just an int array of pool indices and a forward pass is a
`lax.scan` that gathers one layer slice per step. The *shell* (embeddings, final norm, head) comes
from one chosen model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hm3jax.models.config import ModelConfig
from hm3jax.models.params import SHELL_KEYS, iter_leaves

SKIP = -1  # a path entry that runs no layer


class PoolError(ValueError):
    """Models whose layers cannot share one pool, or a path that does not fit a pool."""


@struct.dataclass
class LayerPool:
    """Stacked layers of several models.

    Attributes:
      layers: the `layers` sub-pytree of the params layout, leading axis = pool size P.
      index: static tuple of (model index, layer index) for each pool entry.
      model_names: static tuple of the source models' names.
    """

    layers: dict
    index: tuple = struct.field(pytree_node=False)
    model_names: tuple = struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        return len(self.index)

    def lookup(self, model: int | str, layer: int) -> int:
        """Pool index of `layer` of `model` (a model index or name)."""
        if isinstance(model, str):
            if model not in self.model_names:
                raise PoolError(f"layer pool has no model {model!r}; its models: {', '.join(self.model_names)}")
            m = self.model_names.index(model)
        else:
            m = model
        try:
            return self.index.index((m, layer))
        except ValueError:
            raise PoolError(f"layer pool has no layer {layer} of model {model!r}") from None

    def path(self, steps: Sequence[tuple[int | str, int] | None]) -> np.ndarray:
        """An int32 path from (model, layer) pairs; None means skip the step."""
        return np.asarray([SKIP if s is None else self.lookup(*s) for s in steps], np.int32)

    def describe(self, path) -> list[tuple[str, int] | None]:
        """(model name, layer) for each step of `path`; None for skipped steps."""
        out = []
        for i in np.asarray(path).tolist():
            if i == SKIP:
                out.append(None)
            else:
                m, l = self.index[i]
                out.append((self.model_names[m], l))
        return out

    def check_path(self, path) -> None:
        """Raise PoolError unless every entry of `path` is SKIP or a valid pool index."""
        p = np.asarray(path)
        bad = p[(p < SKIP) | (p >= self.size)]
        if bad.size:
            raise PoolError(f"path entries {sorted(set(bad.tolist()))} are outside the pool "
                            f"(valid: -1 to skip, or 0..{self.size - 1})")


def build_pool(models: Sequence[dict], names: Sequence[str] | None = None,
               cfgs: Sequence[ModelConfig] | None = None) -> LayerPool:
    """Stack the layers of `models` (params pytrees) into one LayerPool.

    Args:
      models: params pytrees, each with a `layers` sub-tree stacked on a leading layer axis.
      names: a name per model (default "model0", "model1", ...), used in errors and `describe`.
      cfgs: optional ModelConfigs; when given, their layer signatures (widths, heads, biases) must
        agree too, which catches models whose tensors happen to share shapes but not head layout.
    Returns:
      LayerPool with P = sum of layer counts, in model order.
    """
    if not models:
        raise PoolError("build_pool needs at least one model")
    names = tuple(names) if names is not None else tuple(f"model{i}" for i in range(len(models)))
    if len(names) != len(models):
        raise PoolError(f"{len(names)} names for {len(models)} models")
    if cfgs is not None:
        ref = cfgs[0].layer_signature
        for n, c in zip(names, cfgs):
            if c.layer_signature != ref:
                raise PoolError(f"model {n!r} has layer layout {c.layer_signature} "
                                f"(hidden, ffn, heads, kv heads, head_dim, qkv bias, mlp bias); "
                                f"model {names[0]!r} has {ref}")
    ref_leaves = dict(iter_leaves(models[0]["layers"]))
    index = []
    for m, (n, params) in enumerate(zip(names, models)):
        leaves = dict(iter_leaves(params["layers"]))
        if set(leaves) != set(ref_leaves):
            diff = sorted("/".join(p) for p in set(leaves) ^ set(ref_leaves))
            raise PoolError(f"model {n!r} and model {names[0]!r} have different layer tensors: "
                            f"{', '.join(diff)}")
        n_layers = None
        for p, a in leaves.items():
            want = ref_leaves[p].shape[1:]
            if a.shape[1:] != want:
                raise PoolError(f"layer tensor layers/{'/'.join(p)}: model {n!r} has per-layer shape "
                                f"{tuple(a.shape[1:])}, model {names[0]!r} has {tuple(want)}; "
                                f"only models of the same width can share a pool")
            n_layers = a.shape[0] if n_layers is None else n_layers
        index += [(m, l) for l in range(n_layers)]
    layers = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[p["layers"] for p in models])
    return LayerPool(layers=layers, index=tuple(index), model_names=names)


def shell_of(params: dict) -> dict:
    """The non-layer part of a params pytree (embeddings, final norm, untied head)."""
    return {k: params[k] for k in SHELL_KEYS if k in params}
