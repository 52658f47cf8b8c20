"""The merge methods as functions with explicit signatures: averaging, spherical and entry-selective
methods (the task-arithmetic family and the arguments all methods share: merging/api.py).

Methods whose base is "ignored" (linear, karcher, passthrough) take base=None: mergekit makes a
recipe's base model one more input, so put it in `models`.
"""

from __future__ import annotations

from typing import Any

from hm3jax.merging.api import IsStacked, Models, PyTree, Value, run


def linear(base: None, models: Models, weights: Value, *, normalize: bool = True,
           compute_dtype: Any = "float32", is_stacked: IsStacked = None) -> PyTree:
    """Linear (arXiv:2203.05482): the weighted average Σ w_i θ_i / Σ w_i.

    Args:
      base: None (a recipe's base model is one more weighted input).
      models, weights: see hm3jax.merging.api (weights `[M]`).
      normalize: divide by Σ w_i (a zero sum gives NaN/Inf, as in mergekit). Default True.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree (the first model's structure and dtypes).
    """
    return run("linear", base, models, weights, {"normalize": normalize}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def model_stock(base: PyTree, models: Models, *, filter_wise: bool = False, compute_dtype: Any = "float32",
                is_stacked: IsStacked = None) -> PyTree:
    """Model Stock (arXiv:2403.19522): t·mean(θ_i) + (1 − t)·θ_base, t = N·c / (1 + (N − 1)·c).

    c is the mean pairwise cosine of the offsets θ_i − θ_base; needs M >= 2 models.

    Args:
      base: the base model's params; models: M >= 2 pytrees (see hm3jax.merging.api).
      filter_wise: one c per row (last axis) instead of per tensor. Default False.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("model_stock", base, models, None, {"filter_wise": filter_wise}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def sce(base: PyTree, models: Models, *, select_topk: Value = 1.0, int8_mask: bool = False,
        compute_dtype: Any = "float32", is_stacked: IsStacked = None) -> PyTree:
    """SCE (arXiv:2408.07990): select high-variance entries, weight by energy, erase sign conflicts.

    Args:
      base, models: see hm3jax.merging.api.
      select_topk: fraction of the highest-variance entries (across models) kept. Default 1.
      int8_mask: no effect.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("sce", base, models, None, {"select_topk": select_topk, "int8_mask": int8_mask}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def passthrough(base: None, models: Models, *, scale: Value = None, compute_dtype: Any = "float32",
                is_stacked: IsStacked = None) -> PyTree:
    """Passthrough: the one model's tensors, times `scale` when given (layer stacking: stack_layers).

    Args:
      base: None; models: exactly one pytree (see hm3jax.merging.api).
      scale: optional factor applied to every tensor. Default None (unchanged).
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the model's pytree (scaled).
    """
    return run("passthrough", base, models, None, {"scale": scale}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def slerp(base: PyTree, models: Models, *, t: Value, compute_dtype: Any = "float32",
          is_stacked: IsStacked = None) -> PyTree:
    """SLERP between the base (t = 0) and exactly one other model (t = 1), one angle per tensor.

    Nearly collinear tensors (|cos| > 0.9995) are interpolated linearly.

    Args:
      base: the base model's params; models: exactly one pytree (see hm3jax.merging.api).
      t: interpolation factor (required): a scalar, or per tensor a pytree (a per-layer `[L]` array
        for a stacked leaf).
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("slerp", base, models, None, {"t": t}, {}, compute_dtype=compute_dtype, is_stacked=is_stacked)


def nuslerp(base: PyTree | None, models: Models, weights: Value, *, nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True, compute_dtype: Any = "float32", is_stacked: IsStacked = None) -> PyTree:
    """NuSLERP: SLERP of two models (of their task vectors when a base is given), t = w_1 / (w_0 + w_1).

    Args:
      base: the base model's params or None; models: exactly two pytrees; weights: `[2]`.
      nuslerp_row_wise: one angle per slice along axis 0. Default False.
      nuslerp_flatten: one angle per whole tensor (else per row). Default True.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("nuslerp", base, models, weights,
               {"nuslerp_row_wise": nuslerp_row_wise, "nuslerp_flatten": nuslerp_flatten}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def multislerp(base: PyTree | None, models: Models, weights: Value, *, normalize_weights: bool = True,
               eps: Value = 1e-8, compute_dtype: Any = "float32", is_stacked: IsStacked = None) -> PyTree:
    """Multi-SLERP: the weighted barycentre of M models on the hypersphere (of task vectors with a base).

    Args:
      base: the base model's params or None; models, weights: see hm3jax.merging.api (`[M]`).
      normalize_weights: divide the weights by their sum. Default True.
      eps: guard added to norms. Default 1e-8.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("multislerp", base, models, weights, {"normalize_weights": normalize_weights, "eps": eps}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def karcher(base: None, models: Models, *, max_iter: int = 10, tol: Value = 1e-5, compute_dtype: Any = "float32",
            is_stacked: IsStacked = None) -> PyTree:
    """Karcher mean: the Riemannian mean of the tensors' directions, scaled by their mean norm.

    Args:
      base: None (a recipe's base model is one more input); models: M pytrees.
      max_iter: most Riemannian gradient steps. Default 10.
      tol: convergence / validity tolerance. Default 1e-5.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("karcher", base, models, None, {"max_iter": max_iter, "tol": tol}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)


def arcee_fusion(base: PyTree, models: Models, *, compute_dtype: Any = "float32",
                 is_stacked: IsStacked = None) -> PyTree:
    """Arcee Fusion: the model's entries whose KL-weighted change is an upper outlier, else the base's.

    Args:
      base: the base model's params; models: exactly one pytree.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("arcee_fusion", base, models, None, {}, {}, compute_dtype=compute_dtype, is_stacked=is_stacked)


def nearswap(base: PyTree, models: Models, *, t: Value, compute_dtype: Any = "float32",
             is_stacked: IsStacked = None) -> PyTree:
    """NearSwap: move each base entry towards the model by clip(t / |θ_base − θ|, 0, 1).

    Args:
      base: the base model's params; models: exactly one pytree.
      t: distance under which an entry takes the model's value (required).
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("nearswap", base, models, None, {"t": t}, {}, compute_dtype=compute_dtype, is_stacked=is_stacked)


def ram(base: PyTree, models: Models, *, epsilon: Value = 1e-5, compute_dtype: Any = "float32",
        is_stacked: IsStacked = None) -> PyTree:
    """RAM (arXiv:2601.13572): each entry changed by k models takes the mean of those k changes.

    Args:
      base: the base model's params; models: M >= 1 pytrees.
      epsilon: a |task vector| entry above this counts as changed. Default 1e-5.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("ram", base, models, None, {"epsilon": epsilon}, {}, compute_dtype=compute_dtype,
               is_stacked=is_stacked)


def ramplus_tl(base: PyTree, models: Models, *, r: Value = 0.1, alpha: Value = 0.2, epsilon: Value = 1e-5,
               compute_dtype: Any = "float32", is_stacked: IsStacked = None) -> PyTree:
    """RAM+ (tensor-local; arXiv:2601.13572): RAM with each model's unique changes scaled up by its
    share of overlap, 1 + r·clip(ρ_i, 0, alpha).

    Args:
      base: the base model's params; models: M >= 1 pytrees.
      r: gain on the overlap ratio. Default 0.1.
      alpha: cap on the overlap ratio. Default 0.2.
      epsilon: a |task vector| entry above this counts as changed. Default 1e-5.
      compute_dtype, is_stacked: see hm3jax.merging.api.
    Returns the merged pytree.
    """
    return run("ramplus_tl", base, models, None, {"r": r, "alpha": alpha, "epsilon": epsilon}, {},
               compute_dtype=compute_dtype, is_stacked=is_stacked)
