"""Preference vectors on the probability simplex (λ_k >= 0, Σ λ_k = 1), one row per preference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def dirichlet(n: int, k: int, seed: int | jax.Array = 0) -> jax.Array:
    """n preference vectors drawn from Dirichlet(1, ..., 1), i.e. uniform on the simplex.

    Args:
      n: number of vectors (>= 1).
      k: number of objectives (>= 1).
      seed: an int seed or a jax PRNG key.

    Returns:
      float32 [n, k], rows non-negative and summing to 1; the same seed gives the same rows.
    """
    _check_positive("dirichlet", n=n, k=k)
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    # Dirichlet(1, ..., 1) is i.i.d. Exponential(1) draws divided by their sum; this avoids the
    # gamma sampler's rejection loop, which is slow to compile.
    e = jax.random.exponential(key, (n, k), jnp.float32)
    return e / jnp.sum(e, axis=1, keepdims=True)


def das_dennis(k: int, divisions: int) -> jax.Array:
    """The Das-Dennis simplex lattice: every vector with entries i / divisions summing to 1.

    Args:
      k: number of objectives (>= 1).
      divisions: steps per axis (>= 1); each entry is a multiple of 1 / divisions.

    Returns:
      float32 [C(divisions + k - 1, k - 1), k] in descending lexicographic order, from (1, 0, ..., 0)
      to (0, ..., 0, 1); the corners are included.
    """
    _check_positive("das_dennis", k=k, divisions=divisions)
    rows = []
    # Stars and bars: choose where the k - 1 bars go among divisions + k - 1 slots; the gaps between
    # bars are the integer counts of each coordinate.
    for bars in itertools.combinations(range(divisions + k - 1), k - 1):
        edges = (-1,) + bars + (divisions + k - 1,)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(k)])
    # Ascending bar positions give ascending first coordinates; reversed, the grid starts at e_1.
    counts = np.array(rows[::-1], np.float64).reshape(-1, k)
    return jnp.asarray(counts / divisions, jnp.float32)


def _check_positive(where: str, **values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
