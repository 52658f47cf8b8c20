"""What a merge method is (`MergeMethod`), its declared parameters, and the pytree-level merge.

A method is a small immutable record around one per-tensor function

    merge_tensor(base, models, weights, key, *, masks=None, **params) -> merged tensor

with base `[*S]` (or None), models a sequence of M arrays `[*S]` (or one stacked `[M, *S]` array; the
methods never stack them, which would copy), weights `[M]` (or None for methods without weights), a
PRNG key (random methods; else ignored), optional injected keep-masks (M bool arrays `[*S]`; random
methods), and the method's declared parameters. Static parameters (booleans, strings, ints that change
the computation) are Python values; the others are arrays (scalars, or `[M]` for per-model ones) and
may be traced, so a merge vmaps over weights or densities and jits once.

`MergeMethod.merge` applies the method to whole parameter pytrees of any kind `jax.tree_util`
flattens, leaf by leaf. Two hooks say what a leaf is, with the HF layout of models/params.py as the
default: `is_stacked` (the leaves under "layers" stack L tensors on axis 0 and are merged per layer, so
a TIES trim keeps the top-k of each layer's tensor, as a per-tensor merge tool does) and `tensor_name`
(the name whose CRC seeds a random method's per-tensor key). Every tensor's merge runs through one
module-level jitted function, `merge_leaf`, shared with the out-of-core merge (merging/pipeline.py).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hm3jax.merging.checks import (
    check_key,
    check_model_count,
    check_values,
    copied_leaf,
    is_array_leaf,
    is_float_leaf,
    key_keyword,
    model_list,
    stacked_count,
    tracing,
)
from hm3jax.merging.leaves import (
    default_namer,
    hf_is_stacked,
    leaves_like,
    opaque,
    path_names,
    per_leaf,
    shape_param,
)


class _Required:
    """The default of a parameter that must be given (prints as REQUIRED)."""

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self):
        return "REQUIRED"


REQUIRED = _Required()
_F32 = np.dtype(np.float32)
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

    def split_params(self, params: Mapping[str, Any]) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
        """(static parameters as sorted (name, value) pairs, a jit static argument; the traced rest)."""
        static = tuple(sorted((k, v) for k, v in params.items() if k in self.params and self.params[k].static))
        names = {k for k, _ in static}
        return static, {k: v for k, v in params.items() if k not in names}

    @key_keyword(4, method=True)
    def merge(self, base: Any, models: Any, weights: Any = None, *, key: jax.Array | None = None,
              masks: Any = None, compute_dtype: Any = "float32",
              is_stacked: Callable[[tuple[str, ...]], bool] | None = None,
              tensor_name: Callable[[tuple[str, ...], int | None], str] | None = None, **params: Any) -> Any:
        """Merge whole parameter pytrees. Pure; jit/vmap it as any JAX function.

        The pytrees may be of any kind `jax.tree_util` flattens: the HF-layout nested dict of
        models/params.py, a Flax linen `params` dict, an NNX `State`, an equinox module, lists,
        tuples, NamedTuples, `flax.struct` dataclasses. Every float leaf is merged on its own; a
        non-float leaf (integer or bool array, PRNG key, function, ...) is copied when all inputs
        agree on it, else refused. The result has the structure (and per leaf the dtype) of the base
        (else the first model). The module-level functions (`merging.ties`, ...) call this with
        each method's parameters spelled out.

        Args:
          base: params pytree of the base model (None where `self.base` allows it; a method whose
            base is "ignored" takes None: a recipe's base model is one more input in `models`).
          models: a sequence of M params pytrees with the base's structure and shapes, or one pytree
            of the base's structure whose leaves stack the M models on axis 0 (`[M, *leaf]`, as a
            vmapped ensemble fine-tune produces; without a base, any pytree that is not a list or
            tuple). M must lie within `min_models` / `max_models`.
          weights: per-model weights: an `[M]` array, or a pytree of the params' structure whose
            leaves are `[M]` (or `[L, M]` for stacked layers) arrays, for per-tensor weights.
            Ignored by methods without a "weight" parameter (default for those that have one: the
            declared default).
          key: keyword-only PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`) for
            random methods; each tensor uses fold_in(key, crc32(tensor name)), the stream
            `python -m hm3jax.merge --random-seed seed` uses for HF names. (A key given positionally
            after `weights` still works, with a DeprecationWarning.)
          masks: for random methods, injected keep-masks: a pytree of the params' structure with
            bool leaves `[M, *leaf_shape]` (replaces the random draw).
          compute_dtype: dtype the arithmetic runs in; the result takes the base's (else the first
            model's) dtype per leaf.
          is_stacked: `names -> bool` for a leaf's path (a tuple of dict keys / attribute names /
            sequence indices as strings): the leaf stacks L layer tensors on axis 0 and is merged per
            layer (a TIES trim keeps the top-k of each layer, as a per-tensor merge tool does).
            Default: the HF layout's rule, a leaf under a top-level "layers" mapping.
          tensor_name: `(names, layer or None) -> str`, the per-tensor name that seeds random
            methods. Default: for a tree of nested dicts (the HF layout) the HF name
            (`model.layers.{i}.mlp.up_proj.weight`, ...); for any other tree the leaf's
            `jax.tree_util.keystr` (`.layers[0].weight`), with `#{layer}` appended for a layer of a
            stacked leaf.
          **params: the method's parameters. Each value is a scalar, a per-model `[M]` array, for a
            stacked leaf a per-layer `[L]` (shared) or `[L, M]` (per-model) array, or a pytree of the
            params' structure holding any of those per leaf (per-tensor parameters). Concrete values
            are checked as recipes are (density in (0, 1], gamma in [0, 1], ...).
        Returns the merged params pytree.

        Jitting a function that closes over the params (`jax.jit(lambda w: ties(base, models, w))`)
        compiles about as fast as passing them as arguments: concrete leaves met inside a jit trace go
        through `lax.optimization_barrier`, so XLA does not constant-fold the trims of the closed-over
        tensors at compile time (which took 10x longer than compiling the merge).
        """
        key = check_key(key, self.name)
        if self.needs_base and base is None:
            raise ValueError(f"merge method {self.name!r} needs a base model")
        if self.base == "ignored" and base is not None:
            raise ValueError(f"merge method {self.name!r} takes no separate base (mergekit makes a recipe's "
                             "base_model one more input); pass base=None and put the base in models")
        listed, stacked = model_list(base, models)
        n = len(listed) if listed is not None else stacked_count(stacked)
        if n == 0:
            raise ValueError(f"{self.name}: no models to merge")
        check_model_count(self, n)
        params = self.resolve(params, weights_given=weights is not None)
        if self.random and key is None and masks is None:
            raise ValueError(f"merge method {self.name!r} draws random masks: it needs a PRNG key or injected "
                             "masks (key=jax.random.key(seed), or masks=...)")
        is_stacked = hf_is_stacked if is_stacked is None else is_stacked
        ref = base if base is not None else (listed[0] if listed is not None else stacked)
        flat, treedef = jax.tree_util.tree_flatten_with_path(ref)
        if base is None and listed is None:  # the reference's structure, without the model axis
            flat = [(p, leaf[0] if is_array_leaf(leaf) else leaf) for p, leaf in flat]
        names = [path_names(p) for p, _ in flat]
        if tensor_name is None:
            tensor_name = default_namer([p for p, _ in flat], names)
        else:
            user = tensor_name
            tensor_name = lambda j, layer: user(names[j], layer)
        bases = None if base is None else [leaf for _, leaf in flat]
        if listed is not None:
            per_model = [leaves_like(treedef, names, m, f"models[{i}]") for i, m in enumerate(listed)]
            leaf_models = [[ms[j] for ms in per_model] for j in range(len(flat))]
        else:  # one [M, *leaf] array per leaf, sliced inside the jitted merge (no copies)
            leaf_models = leaves_like(treedef, names, stacked, "models (stacked)")
        labels = [f"models[{i}]" for i in range(n)]
        leaf_params = {k: per_leaf(treedef, names, v, k) for k, v in params.items()}
        leaf_weights = per_leaf(treedef, names, weights, "weights")
        leaf_masks = per_leaf(treedef, names, masks, "masks")
        barrier = tracing()  # concrete arrays here would be XLA constants, and their trims folded
        if barrier:
            key = opaque(key)
        out = []
        for j, ((_, ref_leaf), nm) in enumerate(zip(flat, names)):
            path = "/".join(nm)
            shape = np.shape(ref_leaf)
            ms = leaf_models[j]
            got = [np.shape(x) for x in ms] if listed is not None else [np.shape(ms)[1:]] * n
            for i, sh in enumerate(got):
                if is_array_leaf(ref_leaf) and sh != shape:
                    raise ValueError(f"{self.name}: models[{i}] tensor {path} has shape {tuple(sh)}; "
                                     f"expected {tuple(shape)}")
            if not is_float_leaf(ref_leaf):
                items = [ms[i] for i in range(n)]
                if base is not None:
                    inputs, who = items, ["base", *labels]
                else:
                    inputs, who = items[1:], labels
                out.append(copied_leaf(ref_leaf, inputs, who, path, self.name))
                continue
            lp = {k: v[j] for k, v in leaf_params.items()}
            check_values(lp, f"{self.name}: tensor {path}")
            w = leaf_weights[j]
            if self.uses_weights and w is None:
                w = lp.pop("weight", None)
            else:
                lp.pop("weight", None)
            if w is None and self.uses_weights:
                raise ValueError(f"merge method {self.name!r} needs weights")
            mk = leaf_masks[j]
            mk = None if mk is None else [mk[i] for i in range(n)]
            b = None if bases is None else bases[j]
            if barrier:
                b, ms, mk = opaque(b), opaque(ms), opaque(mk)
            merged = self._merge_leaf(j, b, ms, w, key, mk, lp, bool(nm) and is_stacked(nm), tensor_name,
                                      compute_dtype, jnp.result_type(ref_leaf))
            out.append(merged)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _merge_leaf(self, j, base, models, weights, key, masks, params, stacked: bool, tensor_name,
                    compute_dtype, out_dtype):
        m = len(models)
        n_layers = np.shape(models[0])[0] if stacked else None
        params = {k: v if self.params[k].static else
                  shape_param(v, self.params[k].per_model, m, n_layers, k) for k, v in params.items()}
        w = None if weights is None else shape_param(weights, True, m, n_layers, "weights")
        # prepare runs before the map over layers, so concrete values stay concrete (exact keep-counts).
        shape = tuple(np.shape(models[0])[1:] if stacked else np.shape(models[0]))
        params = self.prepare_params(params, shape)
        static, traced = self.split_params(params)
        if key is None or not self.random:
            keys = None
        elif stacked:
            keys = jnp.stack([tensor_key(key, tensor_name(j, i)) for i in range(n_layers)])
        else:
            keys = tensor_key(key, tensor_name(j, None))
        layers = None if not stacked else "vmap" if self.vmap_layers else "map"
        return merge_leaf(base, models, w, keys, masks, traced, merge_tensor=self.merge_tensor,
                          random=self.random, static=static, layers=layers,
                          compute_dtype=np.dtype(compute_dtype), out_dtype=np.dtype(out_dtype))

    def prepare_params(self, params: dict, tensor_shape: tuple) -> dict:
        """Apply the method's host-side `prepare` hook (if any) for a tensor of `tensor_shape`."""
        return params if self.prepare is None else self.prepare(dict(params), tensor_shape)


@functools.partial(jax.jit, static_argnames=("merge_tensor", "random", "static", "layers", "load_dtype",
                                             "compute_dtype", "out_dtype"))
def merge_leaf(base, models, weights, keys, masks, traced, *, merge_tensor: Callable, random: bool,
               static: tuple = (), layers: str | None = None, load_dtype: Any = None,
               compute_dtype: Any = _F32, out_dtype: Any = None) -> jax.Array:
    """One tensor's merge, jitted: the one compiled entry point of in-memory and out-of-core merges.

    The inputs are rounded to `load_dtype` (when given, as mergekit loads them), the arithmetic runs
    in `compute_dtype`, the result is cast to `out_dtype` (when given). `layers`: None for one tensor;
    "vmap" or "map" for a leaf that stacks layers on axis 0 (a vmapped program, or a sequential map
    that keeps data-dependent branches real and one layer's temporaries alive at a time). `static`:
    the static parameters as (name, value) pairs. Compilations are cached by jax.jit itself, keyed on
    these arguments and the input shapes, so no cache of ours grows with the process.
    """

    def cast(x):
        if x is None:
            return None
        x = jnp.asarray(x)
        return (x if load_dtype is None else x.astype(load_dtype)).astype(compute_dtype)

    def one(b, ms, w, k, mk, tr):
        extra = {"masks": mk} if random else {}
        return merge_tensor(b, ms, w, k, **extra, **dict(static), **tr)

    args = (cast(base), [cast(m) for m in models], weights, keys, masks, traced)
    if layers is None:
        out = one(*args)
    elif layers == "vmap":
        out = jax.vmap(one)(*args)
    else:
        out = lax.map(lambda xs: one(*xs), args)
    return out if out_dtype is None else out.astype(out_dtype)


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


