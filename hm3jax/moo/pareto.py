"""Non-dominated filtering and hypervolume, with higher-is-better scores.

Rows are solutions, columns are tasks. moocore minimises, so the hypervolume negates scores and the
reference point before calling it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pareto_mask(scores: jax.Array) -> jax.Array:
    """Which rows no other row dominates (higher is better).

    Row j dominates row i when it is >= on every task and > on at least one. Identical rows do not
    dominate each other, so duplicates of a front point all stay on the front.

    Args:
      scores: [N, K] scores.

    Returns:
      bool [N], True for non-dominated rows. Jittable (O(N^2 K) comparisons).
    """
    if jnp.ndim(scores) != 2:
        raise ValueError(f"pareto_mask: scores must be [N, K] (solutions x tasks), got {jnp.shape(scores)}")
    s = jnp.asarray(scores)
    ge = jnp.all(s[None, :, :] >= s[:, None, :], axis=-1)  # [i, j]: j >= i everywhere
    gt = jnp.any(s[None, :, :] > s[:, None, :], axis=-1)   # [i, j]: j > i somewhere
    return ~jnp.any(ge & gt, axis=1)


def hypervolume(scores, ref) -> float:
    """Volume dominated by `scores` and bounded below by `ref` (higher is better).

    Args:
      scores: [N, K] scores (N may be 0). Rows not strictly above `ref` on every task add nothing.
      ref: [K] reference point, worse than the solutions of interest on every task.

    Returns:
      The hypervolume, a float >= 0.
    """
    # moocore is heavy: loaded only when a hypervolume is computed
    import moocore  # imported on use: only front reporting needs it

    s = np.asarray(scores, np.float64)
    r = np.asarray(ref, np.float64).reshape(-1)
    if s.ndim != 2 or s.shape[1] != r.shape[0]:
        raise ValueError(
            f"hypervolume: scores must be [N, K] and ref [K]; got scores {s.shape}, ref {r.shape}"
        )
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(r))):
        raise ValueError("hypervolume: scores and ref must be finite (found NaN or inf)")
    above = np.all(s > r, axis=1)
    if not above.any():
        return 0.0
    # Maximising f above r is minimising -f below -r.
    return float(moocore.hypervolume(-s[above], ref=-r))
