"""Scalarisations of a score vector under a preference λ (jnp, so they jit and vmap).

Scores follow the project convention: higher is better on every task. The weighted sum is to be
maximised; the Tchebycheff distance to the ideal point is to be minimised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(where: str, scores: jax.Array, *others: tuple[str, jax.Array]) -> None:
    k = jnp.shape(scores)[-1] if jnp.ndim(scores) else None
    for name, x in others:
        if k is None or jnp.ndim(x) == 0 or jnp.shape(x)[-1] != k:
            raise ValueError(
                f"{where}: scores {jnp.shape(scores)} and {name} {jnp.shape(x)} must share the last "
                "(objective) axis"
            )


def weighted_sum(scores: jax.Array, lam: jax.Array) -> jax.Array:
    """Σ_k λ_k f_k (higher is better).

    Args:
      scores: [..., K] objective values f.
      lam: [..., K] preference weights (broadcast against scores).

    Returns:
      [...] the weighted sums.
    """
    _check("weighted_sum", scores, ("lam", lam))
    return jnp.sum(jnp.asarray(lam) * jnp.asarray(scores), axis=-1)


def tchebycheff(scores: jax.Array, lam: jax.Array, ideal: jax.Array) -> jax.Array:
    """max_k λ_k |f_k - z*_k| (lower is better): the weighted distance to the ideal point z*.

    Args:
      scores: [..., K] objective values f.
      lam: [..., K] preference weights.
      ideal: [..., K] ideal point z* (e.g. ideal_point of the fine-tuned experts' scores).

    Returns:
      [...] the Tchebycheff values.
    """
    _check("tchebycheff", scores, ("lam", lam), ("ideal", ideal))
    return jnp.max(jnp.asarray(lam) * jnp.abs(jnp.asarray(scores) - jnp.asarray(ideal)), axis=-1)


def ideal_point(scores: jax.Array) -> jax.Array:
    """[K] best score on each task over the rows of [N, K] scores (the paper's z*)."""
    if jnp.ndim(scores) != 2 or jnp.shape(scores)[0] == 0:
        raise ValueError(f"ideal_point: scores must be [N, K] with N >= 1, got shape {jnp.shape(scores)}")
    return jnp.max(jnp.asarray(scores), axis=0)
