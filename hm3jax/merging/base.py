"""What a merge method is (`MergeMethod`), its declared parameters, and the pytree-level merge.

A method is a small immutable record around one per-tensor function

    merge_tensor(base, models, weights, key, *, masks=None, **params) -> merged tensor

with base `[*S]` (or None), models a sequence of M arrays `[*S]` (or one stacked `[M, *S]` array; the
methods never stack them, which would copy), weights `[M]` (or None for methods without weights), a
PRNG key (random methods; else ignored), optional injected keep-masks (M bool arrays `[*S]`; random
methods), and the method's declared parameters. Static parameters (booleans, strings, ints that change
the computation) are Python values; the others are arrays (scalars, or `[M]` for per-model ones) and
may be traced, so a merge vmaps over weights or densities and jits once.

`MergeMethod.merge` applies the method to whole parameter pytrees (see models/params.py): every leaf is
one HF tensor, except the leaves under "layers", which stack L tensors on axis 0 and are merged per
layer (a TIES trim keeps the top-k of each layer's tensor, as a per-tensor merge tool does).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hm3jax.models.params import Path, get_path, hf_name, iter_leaves, set_path

REQUIRED = object()  # default of a parameter that must be given
_LEAF_FNS: dict[tuple, Callable] = {}
BASE_POLICIES = ("required", "optional", "ignored")


class Param(NamedTuple):
    """A declared method parameter.

    default: value when the recipe/caller gives none (`REQUIRED` = must be given).
    per_model: one value per input model (weight, density, ...) instead of one shared value.
    static: a Python value that selects code paths (not traced; a change recompiles).
    doc: one line for error messages and docs.
    """

    default: Any = REQUIRED
    per_model: bool = False
    static: bool = False
    doc: str = ""


class MergeMethod(NamedTuple):
    """A merge method: its name, declared parameters and per-tensor function.

    base: "required" (the base is separate from `models`), "optional" (base may be None), or
      "ignored" (no base: a base model named by a recipe is just one more input in `models`).
    random: whether `merge_tensor` uses its key (or injected masks).
    min_models / max_models: bounds on M (the number of non-base inputs).
    prepare: optional host-side hook `(params, tensor_shape) -> params` run before the per-tensor
      function, where values may still be concrete (e.g. exact float64 keep-counts for trims).
    vmap_layers: `merge_tensor` has no data-dependent branch, so the layers of a stacked leaf are
      merged by one vmapped program (one fused pass over the whole leaf) instead of a sequential map
      over layers (which keeps branches real and one layer's temporaries alive at a time).
    """

    name: str
    params: Mapping[str, Param]
    base: str
    random: bool
    merge_tensor: Callable[..., jax.Array]
    min_models: int = 1
    max_models: int | None = None
    prepare: Callable[[dict, tuple], dict] | None = None
    doc: str = ""
    vmap_layers: bool = False

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def uses_weights(self) -> bool:
        return "weight" in self.params

    def defaults(self) -> dict[str, Any]:
        """Declared defaults (parameters without one are left out)."""
        return {k: p.default for k, p in self.params.items() if p.default is not REQUIRED}

    def resolve(self, params: Mapping[str, Any], where: str = "", weights_given: bool = False) -> dict[str, Any]:
        """Defaults filled in; unknown or missing parameters raise ValueError naming them.

        `weights_given`: the weights come separately (positional `weights`), so "weight" may be absent.
        """
        at = f" ({where})" if where else ""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {', '.join(unknown)}{at}; "
                             f"its parameters: {', '.join(self.params) or 'none'}")
        out = {**self.defaults(), **params}
        missing = [k for k in self.params if k not in out and not (weights_given and k == "weight")]
        if missing:
            raise ValueError(f"merge method {self.name!r} needs parameter(s) {', '.join(missing)}{at}")
        return out

    def merge(self, base: Any, models: Sequence[Any], weights: Any = None, key: jax.Array | None = None,
              *, masks: Any = None, compute_dtype: Any = jnp.float32, **params: Any) -> dict:
        """Merge whole parameter pytrees. Pure; jit/vmap it as any JAX function.

        Args:
          base: params pytree of the base model (None where `self.base` allows it).
          models: sequence of M params pytrees with the same structure and shapes.
          weights: per-model weights: an `[M]` array, or a dict mirroring the params tree whose leaves
            are `[M]` (or `[L, M]` under "layers") arrays, for per-tensor weights. Ignored by methods
            without a "weight" parameter (default for those that have one: the declared default).
          key: PRNG key for random methods; each tensor uses fold_in(key, crc32(HF name)), the same
            stream `python -m hm3jax.merge` uses, so both give identical results.
          masks: for random methods, injected keep-masks: a dict mirroring the params tree with bool
            leaves `[M, *leaf_shape]` (replaces the random draw).
          compute_dtype: dtype the arithmetic runs in; the result takes the base's (else the first
            model's) dtype per leaf.
          **params: the method's parameters. Each value is a scalar, a per-model `[M]` array, for a
            stacked layer leaf a per-layer `[L]` (shared) or `[L, M]` (per-model) array, or a dict
            mirroring the params tree holding any of those per leaf (per-tensor parameters).
        Returns the merged params pytree.
        """
        models = list(models)
        if not models:
            raise ValueError(f"{self.name}: no models to merge")
        if self.needs_base and base is None:
            raise ValueError(f"merge method {self.name!r} needs a base model")
        params = self.resolve(params, weights_given=weights is not None)
        ref = base if base is not None else models[0]
        out: dict = {}
        for path, ref_leaf in iter_leaves(ref):
            b = get_path(base, path) if base is not None else None
            ms = [jnp.asarray(get_path(m, path), compute_dtype) for m in models]
            leaf_params = {k: _leaf_value(v, path, k) for k, v in params.items()}
            w = _leaf_value(weights, path, "weights") if weights is not None else None
            mk = _leaf_value(masks, path, "masks") if masks is not None else None
            mk = None if mk is None else [mk[i] for i in range(len(models))]
            if self.uses_weights and w is None:
                w = leaf_params.pop("weight", None)
            else:
                leaf_params.pop("weight", None)
            if w is None and self.uses_weights:
                raise ValueError(f"merge method {self.name!r} needs weights")
            bb = None if b is None else jnp.asarray(b, compute_dtype)
            stacked = path[0] == "layers"
            merged = self._merge_leaf(path, bb, ms, w, key, mk, leaf_params, stacked)
            set_path(out, path, merged.astype(jnp.asarray(ref_leaf).dtype))
        return out

    def _merge_leaf(self, path: Path, base, models, weights, key, masks, params, stacked: bool):
        m = len(models)
        n_layers = models[0].shape[0] if stacked else None
        params = {k: v if self.params[k].static else
                  _shape_param(v, self.params[k].per_model, m, n_layers, k) for k, v in params.items()}
        w = None if weights is None else _shape_param(weights, True, m, n_layers, "weights")
        # prepare runs before the map over layers, so concrete values stay concrete (exact keep-counts).
        params = self.prepare_params(params, tuple(models[0].shape[1:] if stacked else models[0].shape))
        static = {k: v for k, v in params.items() if k in self.params and self.params[k].static}
        traced = {k: v for k, v in params.items() if k not in static}
        if stacked:
            keys = None if key is None else jnp.stack([tensor_key(key, hf_name(path, i)) for i in range(n_layers)])
        else:
            keys = tensor_key(key, hf_name(path))
        return self._leaf_fn(static, stacked)(base, models, w, keys, masks, traced)

    def _leaf_fn(self, static: dict, stacked: bool):
        """The jitted merge of one leaf (cached), so eager pytree merges compile once per shape."""
        cache_key = (self.name, id(self.merge_tensor), tuple(sorted(static.items())), stacked,
                     self.vmap_layers)
        fn = _LEAF_FNS.get(cache_key)
        if fn is not None:
            return fn

        def one(b, ms, w, k, mk, tr):
            return self.apply_tensor(b, ms, w, k, mk, static, tr)

        def leaf(base, models, w, keys, masks, traced):
            if not stacked:
                return one(base, models, w, keys, masks, traced)
            if self.vmap_layers:
                return jax.vmap(one)(base, models, w, keys, masks, traced)
            # A sequential map over layers, not vmap: the trims' data-dependent branches stay real
            # branches (under vmap lax.cond runs both sides), and only one layer's temporaries live
            # at a time.
            return lax.map(lambda xs: one(*xs), (base, models, w, keys, masks, traced))

        fn = _LEAF_FNS[cache_key] = jax.jit(leaf)
        return fn

    def prepare_params(self, params: dict, tensor_shape: tuple) -> dict:
        """Apply the method's host-side `prepare` hook (if any) for a tensor of `tensor_shape`."""
        return params if self.prepare is None else self.prepare(dict(params), tensor_shape)

    def apply_tensor(self, base, models, weights, key, masks, static: dict, traced: dict) -> jax.Array:
        """`merge_tensor` with prepared parameters split into static and traced ones (masks: random only)."""
        if self.random:
            return self.merge_tensor(base, models, weights, key, masks=masks, **static, **traced)
        return self.merge_tensor(base, models, weights, key, **static, **traced)


def sum_models(xs: Sequence[jax.Array]) -> jax.Array:
    """Σ of M arrays (a sequence, or the leading axis of one array) as M − 1 elementwise adds.

    XLA:CPU compiles a reduction over a small leading axis (jnp.sum(x, axis=0)) into a loop that runs
    ~100x below memory bandwidth; unrolled adds fuse into one pass. M is static and small.
    """
    xs = list(xs)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def tensor_key(key: jax.Array | None, name: str) -> jax.Array | None:
    """The PRNG key of one HF tensor: independent of merge order and of which tensors are merged."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _leaf_value(v: Any, path: Path, what: str) -> Any:
    if isinstance(v, dict):
        try:
            return get_path(v, path)
        except (KeyError, TypeError):
            raise ValueError(f"per-tensor {what} has no entry for {'/'.join(path)}") from None
    return v


def _shape_param(v: Any, per_model: bool, m: int, n_layers: int | None, what: str) -> Any:
    """Broadcast a parameter to `[M]`/scalar (one tensor) or `[L, M]`/`[L]` (stacked layers)."""
    if v is None or isinstance(v, (str, bool)):
        return v
    # Host values stay numpy (float64) so `prepare` can compute exact counts from them.
    xp = jnp if isinstance(v, jax.Array) else np
    a = v if isinstance(v, jax.Array) else np.asarray(v)
    lead = () if n_layers is None else (n_layers,)
    want = lead + ((m,) if per_model else ())
    if a.ndim == 0 or (per_model and a.ndim == 1 and a.shape[0] in (m, 1)) or a.shape == want or (n_layers is not None and a.ndim == (2 if per_model else 1) and a.shape[0] == n_layers):
        pass
    else:
        raise ValueError(f"parameter {what}: shape {tuple(a.shape)} does not broadcast to {want}")
    if n_layers is not None and a.ndim == (1 if per_model else 0):
        a = a[None]  # per-model (or scalar) value shared by every layer
    if per_model and a.ndim == (0 if n_layers is None else 1):
        a = a[..., None]
    return xp.broadcast_to(a, want)
