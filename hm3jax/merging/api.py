"""The merge methods as functions with explicit signatures: the task-arithmetic family.

Each function calls `METHODS[name].merge` (base.MergeMethod.merge) with the method's parameters
spelled out, so `help(merging.ties)` and an IDE show them with their defaults. Arguments every method
shares:

  base: params pytree of the base model (any pytree `jax.tree_util` flattens).
  models: M params pytrees of the base's structure (a sequence), or one pytree whose leaves stack
    them on axis 0 (`[M, *leaf]`, e.g. a vmapped ensemble fine-tune).
  weights: per-model weights `[M]` (or a pytree of the params' structure holding them per tensor).
  key: keyword-only PRNG key of random methods (`jax.random.key(seed)`); `masks` injects keep-masks
    (a pytree of the params' structure with bool leaves `[M, *leaf]`) instead.
  compute_dtype: dtype of the arithmetic; the result keeps the base's dtypes.
  is_stacked / tensor_name: hooks saying which leaves stack layers (merged per layer) and what a
    tensor is called (it seeds a random method's per-tensor key); see `MergeMethod.merge`.

A per-model parameter (density, gamma, epsilon) is a scalar or an `[M]` array, or a pytree of the
params' structure holding them per tensor; concrete values are checked as a recipe's are. mergekit's
`lambda` is `lambda_` (`**{"lambda": x}` works too).

Jitting with the params closed over (`jax.jit(lambda w: ties(base, models, w))`) compiles about as
fast as with them as arguments (see `MergeMethod.merge`; figures in benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hm3jax.merging.checks import key_keyword
from hm3jax.merging.methods import METHODS

PyTree = Any  # any pytree of arrays (HF dict, linen params, NNX State, equinox module, ...)
Models = Any  # a sequence of M pytrees, or one pytree with `[M, *leaf]` leaves
Value = Any  # a scalar, an `[M]` array (per model), or a pytree of those per tensor
IsStacked = Callable[[tuple[str, ...]], bool] | None
TensorName = Callable[[tuple[str, ...], int | None], str] | None
_ONE = 1.0  # lambda_'s default (identity tells "not given" from a lambda passed as **{"lambda": x})


def run(name: str, base, models, weights, params: Mapping[str, Any], extra: Mapping[str, Any], *,
        lambda_: Any = None, **common: Any) -> PyTree:
    """METHODS[name].merge with `params`; `extra` (the functions' **kwargs) may hold mergekit's
    `lambda`, and anything else in it is reported by the method as an unknown parameter."""
    extra = dict(extra)
    if lambda_ is not None:
        if "lambda" in extra and lambda_ is not _ONE:
            raise TypeError(f"{name}: give lambda_ or lambda, not both")
        extra.setdefault("lambda", lambda_)
    return METHODS[name].merge(base, models, weights, **common, **params, **extra)


def task_arithmetic(base: PyTree, models: Models, weights: Value, *, normalize: bool = False,
                    lambda_: Value = _ONE, compute_dtype: Any = "float32", is_stacked: IsStacked = None,
                    **kwargs: Any) -> PyTree:
    """Task arithmetic (arXiv:2212.04089): θ_base + λ·Σ_i w_i (θ_i − θ_base).

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      normalize: divide Σ w_i τ_i by Σ w_i (0 -> 1). Default False.
      lambda_: λ, scale of the merged task vector. Default 1.
      compute_dtype, is_stacked: see the module docstring.
    Returns the merged pytree (the base's structure and dtypes).
    """
    return run("task_arithmetic", base, models, weights, {"normalize": normalize}, kwargs, lambda_=lambda_,
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def ties(base: PyTree, models: Models, weights: Value, *, density: Value = 1.0, normalize: bool = True,
         rescale: bool = False, lambda_: Value = _ONE, trim: str = "exact", int8_mask: bool = False,
         compute_dtype: Any = "float32", is_stacked: IsStacked = None, **kwargs: Any) -> PyTree:
    """TIES (arXiv:2306.01708): magnitude trim, sign election, mean of the agreeing task vectors.

    Per tensor: τ_i = θ_i − θ_base keeps its int(density · numel) largest |entries|; δ_i = w_i τ̂_i;
    the elected sign is that of Σ δ_i (0 -> +1); Δ = Σ of the δ_i agreeing with it, divided by the sum
    of the agreeing weights when `normalize`; output θ_base + λ·Δ.

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      density: fraction of each τ_i kept, in (0, 1]: a scalar or `[M]`. Default 1.
      normalize: divide by the sum of the agreeing weights. Default True.
      rescale: rescale each trimmed τ_i to the L1 norm it had before the trim. Default False.
      lambda_: λ. Default 1.
      trim: "exact" (exactly k entries, ties by index, as mergekit), "search" (bisection threshold:
        takes a traced density, partitions over a sharded tensor) or "sort" (a reference).
      int8_mask: mergekit memory option; no effect.
      compute_dtype, is_stacked: see the module docstring.
    Returns the merged pytree.

    Compile time: closing over the params in a jitted function compiles as fast as passing them
    as arguments (5 s against 55-61 s before on a 0.2M-parameter NNX MLP, also vmapped over 9
    weight vectors; benchmarks/ties_compile.py, figures in benchmarks/README.md).
    """
    return run("ties", base, models, weights,
               {"density": density, "normalize": normalize, "rescale": rescale, "trim": trim,
                "int8_mask": int8_mask}, kwargs, lambda_=lambda_, compute_dtype=compute_dtype,
               is_stacked=is_stacked)


@key_keyword(3)
def dare_ties(base: PyTree, models: Models, weights: Value, *, key: Any = None, density: Value = 1.0,
              normalize: bool = False, rescale: bool = True, lambda_: Value = _ONE, int8_mask: bool = False,
              masks: PyTree | None = None, compute_dtype: Any = "float32", is_stacked: IsStacked = None,
              tensor_name: TensorName = None, **kwargs: Any) -> PyTree:
    """DARE-TIES (arXiv:2311.03099): random drop with rescale, then TIES' sign election.

    Per tensor: each entry of τ_i is kept with probability `density`; the kept τ̂_i is rescaled to
    the L1 norm of τ_i (`rescale`); then as `ties`: δ_i = w_i τ̂_i, sign election, Δ = Σ agreeing δ_i
    (divided by the agreeing weights when `normalize`), output θ_base + λ·Δ. The masks come from a
    keyed hash, not mergekit's torch stream: the same in distribution, not in value.

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      key: PRNG key (keyword-only; a positional one is deprecated). Required unless `masks`.
      density: keep probability, in (0, 1]: a scalar or `[M]`. Default 1.
      normalize: divide by the sum of the agreeing weights. Default False.
      rescale: L1 norm-ratio rescale after the drop. Default True.
      lambda_: λ. Default 1.
      int8_mask: mergekit memory option; no effect.
      masks, compute_dtype, is_stacked, tensor_name: see the module docstring.
    Returns the merged pytree.
    """
    return run("dare_ties", base, models, weights,
               {"density": density, "normalize": normalize, "rescale": rescale, "int8_mask": int8_mask},
               kwargs, lambda_=lambda_, key=key, masks=masks, compute_dtype=compute_dtype,
               is_stacked=is_stacked, tensor_name=tensor_name)


@key_keyword(3)
def dare_linear(base: PyTree, models: Models, weights: Value, *, key: Any = None, density: Value = 1.0,
                normalize: bool = False, rescale: bool = True, lambda_: Value = _ONE, int8_mask: bool = False,
                masks: PyTree | None = None, compute_dtype: Any = "float32", is_stacked: IsStacked = None,
                tensor_name: TensorName = None, **kwargs: Any) -> PyTree:
    """DARE (arXiv:2311.03099): random drop with rescale, then task arithmetic (no sign election).

    Per tensor: each entry of τ_i is kept with probability `density`, rescaled to τ_i's L1 norm
    (`rescale`); output θ_base + λ·Σ w_i τ̂_i (divided by Σ w_i when `normalize`). Masks as dare_ties.

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      key: PRNG key (keyword-only). Required unless `masks`.
      density: keep probability, in (0, 1]: a scalar or `[M]`. Default 1.
      normalize: divide by Σ w_i. Default False.
      rescale: L1 norm-ratio rescale after the drop. Default True.
      lambda_: λ. Default 1.
      int8_mask: no effect.
      masks, compute_dtype, is_stacked, tensor_name: see the module docstring.
    Returns the merged pytree.
    """
    return run("dare_linear", base, models, weights,
               {"density": density, "normalize": normalize, "rescale": rescale, "int8_mask": int8_mask},
               kwargs, lambda_=lambda_, key=key, masks=masks, compute_dtype=compute_dtype,
               is_stacked=is_stacked, tensor_name=tensor_name)


def breadcrumbs(base: PyTree, models: Models, weights: Value, *, density: Value = 1.0, gamma: Value = 0.01,
                normalize: bool = False, rescale: bool = False, lambda_: Value = _ONE, int8_mask: bool = False,
                compute_dtype: Any = "float32", is_stacked: IsStacked = None, **kwargs: Any) -> PyTree:
    """Model Breadcrumbs (arXiv:2312.06795): drop the largest and the smallest entries of each τ_i.

    Per tensor: the top `gamma` fraction of |τ_i| is dropped, and enough of the bottom that a
    `density` fraction is kept; output θ_base + λ·Σ w_i τ̂_i (divided by Σ w_i when `normalize`).

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      density: fraction kept, in (0, 1]: a scalar or `[M]`. Default 1.
      gamma: fraction of the largest entries dropped, in [0, 1]. Default 0.01.
      normalize: divide by Σ w_i. Default False.
      rescale: L1 norm-ratio rescale after the drop. Default False.
      lambda_: λ. Default 1.
      int8_mask: no effect.
      compute_dtype, is_stacked: see the module docstring.
    Returns the merged pytree.
    """
    return run("breadcrumbs", base, models, weights,
               {"density": density, "gamma": gamma, "normalize": normalize, "rescale": rescale,
                "int8_mask": int8_mask}, kwargs, lambda_=lambda_, compute_dtype=compute_dtype, is_stacked=is_stacked)


def breadcrumbs_ties(base: PyTree, models: Models, weights: Value, *, density: Value = 1.0, gamma: Value = 0.01,
                     normalize: bool = False, rescale: bool = False, lambda_: Value = _ONE, int8_mask: bool = False,
                     compute_dtype: Any = "float32", is_stacked: IsStacked = None, **kwargs: Any) -> PyTree:
    """Breadcrumbs with TIES' sign election (arXiv:2312.06795).

    Per tensor: the breadcrumbs drop (see `breadcrumbs`), δ_i = w_i τ̂_i, the sign of Σ δ_i elected,
    Δ = Σ of the agreeing δ_i (divided by the agreeing weights when `normalize`); θ_base + λ·Δ.

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      density: fraction kept, in (0, 1]. Default 1.
      gamma: fraction of the largest entries dropped, in [0, 1]. Default 0.01.
      normalize: divide by the agreeing weights. Default False.
      rescale: L1 norm-ratio rescale after the drop. Default False.
      lambda_: λ. Default 1.
      int8_mask: no effect.
      compute_dtype, is_stacked: see the module docstring.
    Returns the merged pytree.
    """
    return run("breadcrumbs_ties", base, models, weights,
               {"density": density, "gamma": gamma, "normalize": normalize, "rescale": rescale,
                "int8_mask": int8_mask}, kwargs, lambda_=lambda_, compute_dtype=compute_dtype, is_stacked=is_stacked)


@key_keyword(3)
def della(base: PyTree, models: Models, weights: Value, *, key: Any = None, density: Value = 1.0,
          epsilon: Value = 0.15, normalize: bool = True, rescale: bool = True, lambda_: Value = _ONE,
          int8_mask: bool = False, masks: PyTree | None = None, compute_dtype: Any = "float32",
          is_stacked: IsStacked = None, tensor_name: TensorName = None, **kwargs: Any) -> PyTree:
    """DELLA-TIES (arXiv:2406.11617): magnitude-ranked random drop, then TIES' sign election.

    Per row of τ_i, an entry's keep probability grows with its magnitude rank, from density − ε to
    density + ε; kept entries are rescaled to τ_i's L1 norm (`rescale`); then sign election and the
    mean of the agreeing δ_i = w_i τ̂_i (`normalize`); output θ_base + λ·Δ. Masks as dare_ties.

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      key: PRNG key (keyword-only). Required unless `masks`.
      density: mean keep probability, in (0, 1]. Default 1.
      epsilon: spread of the keep probabilities; density ± epsilon must lie in (0, 1). Default 0.15.
      normalize: divide by the agreeing weights. Default True.
      rescale: L1 norm-ratio rescale after the drop. Default True.
      lambda_: λ. Default 1.
      int8_mask: no effect.
      masks, compute_dtype, is_stacked, tensor_name: see the module docstring.
    Returns the merged pytree.
    """
    return run("della", base, models, weights,
               {"density": density, "epsilon": epsilon, "normalize": normalize, "rescale": rescale,
                "int8_mask": int8_mask}, kwargs, lambda_=lambda_, key=key, masks=masks,
               compute_dtype=compute_dtype, is_stacked=is_stacked, tensor_name=tensor_name)


@key_keyword(3)
def della_linear(base: PyTree, models: Models, weights: Value, *, key: Any = None, density: Value = 1.0,
                 epsilon: Value = 0.15, normalize: bool = False, rescale: bool = True, lambda_: Value = _ONE,
                 int8_mask: bool = False, masks: PyTree | None = None, compute_dtype: Any = "float32",
                 is_stacked: IsStacked = None, tensor_name: TensorName = None, **kwargs: Any) -> PyTree:
    """DELLA (arXiv:2406.11617): magnitude-ranked random drop, then task arithmetic.

    The drop of `della`; output θ_base + λ·Σ w_i τ̂_i (divided by Σ w_i when `normalize`).

    Args:
      base, models, weights: see the module docstring (weights `[M]`).
      key: PRNG key (keyword-only). Required unless `masks`.
      density: mean keep probability, in (0, 1]. Default 1.
      epsilon: spread of the keep probabilities. Default 0.15.
      normalize: divide by Σ w_i. Default False.
      rescale: L1 norm-ratio rescale after the drop. Default True.
      lambda_: λ. Default 1.
      int8_mask: no effect.
      masks, compute_dtype, is_stacked, tensor_name: see the module docstring.
    Returns the merged pytree.
    """
    return run("della_linear", base, models, weights,
               {"density": density, "epsilon": epsilon, "normalize": normalize, "rescale": rescale,
                "int8_mask": int8_mask}, kwargs, lambda_=lambda_, key=key, masks=masks,
               compute_dtype=compute_dtype, is_stacked=is_stacked, tensor_name=tensor_name)
