"""Multi-objective toolkit: preferences, scalarisations, Pareto filtering, hypervolume, front plots.

Scores are higher-is-better, rows = solutions, columns = tasks.
"""

from hm3jax.moo.pareto import hypervolume, pareto_mask
from hm3jax.moo.plots import plot_front, plot_pairs
from hm3jax.moo.preferences import das_dennis, dirichlet
from hm3jax.moo.scalarize import ideal_point, tchebycheff, weighted_sum

__all__ = [
    "das_dennis",
    "dirichlet",
    "hypervolume",
    "ideal_point",
    "pareto_mask",
    "plot_front",
    "plot_pairs",
    "tchebycheff",
    "weighted_sum",
]
