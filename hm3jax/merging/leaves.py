"""The leaves of a params pytree: their names (paths, HF tensor names, random-method seeds), per-leaf
values (shared or per-tensor parameters), the models' matching leaves, and parameter broadcasting.
Used by MergeMethod.merge (base.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hm3jax.merging.checks import is_traced
from hm3jax.models.params import get_path, hf_name


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A `jax.tree_util` key path as strings: dict keys, attribute names, sequence indices."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def hf_is_stacked(names: tuple[str, ...]) -> bool:
    """The HF layout's rule (models/params.py): leaves under a top-level "layers" mapping stack layers."""
    return len(names) > 1 and names[0] == "layers" and not names[1].isdigit()


def hf_tensor_name(names: tuple[str, ...], layer: int | None = None) -> str:
    """The HF tensor name of a leaf of the HF layout (`models.params.hf_name`), for any path."""
    return hf_name(tuple(names), layer)


def default_namer(paths: Sequence[Any], names: list[tuple[str, ...]]) -> Callable[[int, int | None], str]:
    """Leaf j's tensor name for random methods: the HF name in a tree of nested dicts (the HF layout,
    models/params.py) where it has one, else `jax.tree_util.keystr` of its path (`#{layer}` added for a
    layer of a stacked leaf)."""
    dict_tree = all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for p in paths for k in p)

    def name(j: int, layer: int | None) -> str:
        nm = names[j]
        if dict_tree and nm and (nm[0] == "layers") == (layer is not None):
            return hf_tensor_name(nm, layer)
        s = jax.tree_util.keystr(tuple(paths[j]))
        return s if layer is None else f"{s}#{layer}"

    return name


def opaque(tree: Any) -> Any:
    """Concrete arrays passed through `lax.optimization_barrier` (under a jit trace), so XLA treats them
    as values computed at run time instead of constants to fold; traced values are left alone."""
    def one(x):
        if x is None or is_traced(x) or not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(lax.optimization_barrier(jax.random.key_data(x)), impl=impl)
        return lax.optimization_barrier(jnp.asarray(x))

    return jax.tree.map(one, tree)


def _is_value(v: Any) -> bool:
    """A value shared by every leaf (not a pytree of per-leaf values)."""
    return v is None or isinstance(v, (str, bool, int, float, complex, np.ndarray, np.generic, jax.Array))


def per_leaf(treedef, names: list[tuple[str, ...]], v: Any, what: str) -> list[Any]:
    """`v` for each leaf: one shared value, or a pytree of the params' structure (per-tensor values)."""
    shared_seq = (isinstance(v, (list, tuple)) and not hasattr(v, "_fields")  # a NamedTuple is a pytree
                  and all(_is_value(x) for x in v))
    if _is_value(v) or shared_seq:
        return [v] * len(names)
    try:
        return treedef.flatten_up_to(v)
    except (ValueError, TypeError) as e:
        if isinstance(v, Mapping):  # a partial or larger HF-layout dict: look each leaf up by its path
            out = []
            for nm in names:
                try:
                    out.append(get_path(v, nm))
                except (KeyError, TypeError):
                    raise ValueError(f"per-tensor {what} has no entry for {'/'.join(nm)}") from None
            return out
        raise ValueError(f"per-tensor {what}: its structure does not match the params pytree ({e})") from None


def leaves_like(treedef, names: list[tuple[str, ...]], tree: Any, what: str) -> list[Any]:
    """The leaves of `tree`, which must have the reference's structure; else an error naming `what`."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        got = {"/".join(path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        want = {"/".join(nm) for nm in names}
        diff = sorted(want - got)[:3] or sorted(got - want)[:3]
        raise ValueError(f"{what} does not have the base's structure (first differing tensors: "
                         f"{', '.join(diff) or 'container types differ'})") from None


def shape_param(v: Any, per_model: bool, m: int, n_layers: int | None, what: str) -> Any:
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
