"""Checks of a merge's inputs, shared by the in-memory API (base.MergeMethod.merge) and the recipe
planner (plan.py): parameter values, model counts, PRNG keys, non-float leaves, and the two ways of
giving the models (a sequence of pytrees, or one pytree whose leaves stack them on axis 0).

Values that are traced (inside jit/vmap) cannot be checked and pass; concrete ones are checked
wherever they are given (a scalar, a per-model `[M]` array, a per-layer array, a per-tensor pytree).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def tracing() -> bool:
    """Whether the caller runs inside a jit trace (where concrete arrays become XLA constants)."""
    return is_traced(jnp.zeros((), jnp.int32) + 0)


def _concrete(v: Any) -> np.ndarray | None:
    if v is None or isinstance(v, (str, bool)) or is_traced(v):
        return None
    try:
        return np.asarray(v, np.float64)
    except (TypeError, ValueError):
        return None


def _first_bad(original: Any, a: np.ndarray, bad: np.ndarray) -> Any:
    return original if np.ndim(original) == 0 and not is_traced(original) else a[bad].reshape(-1)[0]


def check_values(p: Mapping[str, Any], where: str, error: type[Exception] = ValueError) -> None:
    """The planner's value checks on one tensor's parameters: density in (0, 1], gamma in [0, 1],
    density ± epsilon in (0, 1) (DELLA, for densities below 1), trim one of exact/search/sort.

    `p` holds scalars or arrays (per model, per layer); traced values are not checked.
    Raises `error` naming `where`, the parameter and the first value out of range.
    """
    d = _concrete(p.get("density"))
    if d is not None:
        bad = ~((d > 0) & (d <= 1))
        if bad.any():
            raise error(f"{where}: density {_first_bad(p['density'], d, bad)} is outside (0, 1]")
    g = _concrete(p.get("gamma"))
    if g is not None:
        bad = ~((g >= 0) & (g <= 1))
        if bad.any():
            raise error(f"{where}: gamma {_first_bad(p['gamma'], g, bad)} is outside [0, 1]")
    e = _concrete(p.get("epsilon"))
    if e is not None and d is not None:
        try:
            dd, ee = np.broadcast_arrays(d, e)
        except ValueError:
            dd, ee = d, e
        bad = (dd < 1) & ~((dd - ee > 0) & (dd + ee < 1))
        if np.any(bad):
            i = np.argwhere(bad)[0] if np.ndim(bad) else ()
            raise error(f"{where}: density ± epsilon ({dd[tuple(i)]:g} ± {ee[tuple(i)]:g}) must lie in (0, 1)")
    trim = p.get("trim")
    if trim is not None and trim not in ("exact", "search", "sort"):
        raise error(f"{where}: trim {trim!r}; supported: exact, search, sort")


def check_model_count(method, n: int, where: str = "") -> None:
    """ValueError unless `n` (the number of non-base models) is within the method's bounds."""
    lo, hi = method.min_models, method.max_models
    if n < lo or (hi is not None and n > hi):
        want = (f"exactly {lo}" if lo == hi else
                f"at least {lo}" + (f" and at most {hi}" if hi is not None else ""))
        at = f"{where}: " if where else ""
        raise ValueError(f"{at}merge method {method.name!r} takes {want} non-base model(s), got {n}")


def check_key(key: Any, name: str) -> Any:
    """`key` if it is a PRNG key (typed `jax.random.key` or raw `PRNGKey` uint32[2]) or None; else a
    TypeError that says what to pass as `key=`."""
    if key is None:
        return None
    if isinstance(key, (bool, int, np.integer)):
        raise TypeError(f"{name}: key= takes a PRNG key, not the int {int(key)}; pass key=jax.random.key({int(key)}) "
                        "(the CLI's --random-seed N is key=jax.random.PRNGKey(N))")
    if type(key).__name__ == "Rngs" and type(key).__module__.startswith("flax"):
        raise TypeError(f"{name}: key= takes a PRNG key, not an nnx.Rngs; pass one of its keys, "
                        "key=rngs.params() (or key=rngs())")
    dtype, shape = getattr(key, "dtype", None), np.shape(key) if hasattr(key, "shape") else None
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return key
    if dtype is not None and getattr(dtype, "name", str(dtype)) == "uint32" and shape == (2,):
        return key
    raise TypeError(f"{name}: key= takes one PRNG key (jax.random.key(seed), or a uint32[2] "
                    f"jax.random.PRNGKey(seed)); got {type(key).__name__} with shape {shape} and dtype {dtype}")


def key_keyword(n_positional: int, method: bool = False) -> Callable[[F], F]:
    """Make `key` keyword-only while still accepting it as the argument after the first
    `n_positional` ones (the old signature), with a DeprecationWarning. `inspect.signature` and
    `help()` show the wrapped function's own signature. `method`: `fn` is MergeMethod.merge (its
    messages name the merge method)."""

    def wrap(fn: F) -> F:
        name = fn.__name__

        @functools.wraps(fn)
        def call(*args, **kwargs):
            who = f"{args[0].name}.merge" if method and args else name
            if len(args) > n_positional:
                if len(args) > n_positional + 1:
                    raise TypeError(f"{who}() takes {n_positional} positional arguments but {len(args)} were given")
                if "key" in kwargs:
                    raise TypeError(f"{who}() got a key both positionally and as key=")
                *args, kwargs["key"] = args
                if kwargs["key"] is not None:
                    warnings.warn(f"{who}: pass the PRNG key as key=...; a positional key is deprecated",
                                  DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) and not isinstance(x, bool)


def is_float_leaf(x: Any) -> bool:
    """A leaf that is merged: a floating (or complex) array or Python float."""
    if not is_array_leaf(x):
        return False
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def _same(a: Any, b: Any) -> bool:
    if is_traced(a) or is_traced(b):
        return True  # cannot be checked under a trace; the reference's value is copied
    if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    if hasattr(b, "dtype") and jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
        b = jax.random.key_data(b)
    if is_array_leaf(a) or hasattr(a, "shape"):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        except (TypeError, ValueError):
            return False
    try:
        return bool(a is b or a == b)
    except Exception:
        return False


def copied_leaf(ref: Any, others: Sequence[Any], labels: Sequence[str], path: str, method: str) -> Any:
    """A non-float leaf (integer or bool array, PRNG key, any non-array object) is copied, not merged,
    when every input agrees on it (as `python -m hm3jax.merge` copies integer buffers); else ValueError.
    Under a trace the values cannot be compared and the reference's is copied."""
    for other, label in zip(others, labels[1:]):
        if not _same(ref, other):
            kind = f"{jnp.result_type(ref)} array" if hasattr(ref, "dtype") else type(ref).__name__
            raise ValueError(f"{method}: tensor {path} is a non-float leaf ({kind}) whose values differ between "
                             f"{labels[0]} and {label}; only float leaves are merged, and a non-float leaf is "
                             "copied when all inputs agree on it (as python -m hm3jax.merge does)")
    return ref


def model_list(base: Any, models: Any) -> tuple[list[Any] | None, Any]:
    """(models as a list of M pytrees, None) or (None, one pytree whose leaves are `[M, *leaf]`).

    `models` is stacked when it has the base's structure and every leaf adds one leading axis of the
    same size M to the base's leaf (what a vmapped ensemble fine-tune produces); without a base, when
    it is not a list or tuple.
    """
    if base is not None:
        ref_leaves, ref_def = jax.tree.flatten(base)
        leaves, tdef = jax.tree.flatten(models)
        if tdef == ref_def and leaves:
            lead = {np.shape(x)[:1] for x in leaves}
            if (len(lead) == 1 and all(np.ndim(x) == np.ndim(r) + 1 and np.shape(x)[1:] == np.shape(r)
                                       for x, r in zip(leaves, ref_leaves) if is_array_leaf(r))):
                return None, models
    elif not (isinstance(models, (list, tuple)) and not hasattr(models, "_fields")):
        leaves = [x for x in jax.tree.leaves(models) if is_array_leaf(x)]
        lead = {np.shape(x)[:1] for x in leaves}
        if len(lead) != 1 or () in lead:
            raise ValueError("models: a pytree that is not a list of models must stack them on axis 0 of every "
                             f"leaf (leaves [M, ...] with one M); got leading shapes {sorted(lead)[:4]}")
        return None, models
    if not isinstance(models, Sequence) or isinstance(models, (str, Mapping)):
        raise ValueError("models: expected a sequence of M params pytrees, or one pytree of the base's structure "
                         "whose leaves stack the M models on axis 0")
    return list(models), None


def stacked_count(stacked: Any) -> int:
    leaves = [x for x in jax.tree.leaves(stacked) if is_array_leaf(x)]
    return int(np.shape(leaves[0])[0]) if leaves else 0
