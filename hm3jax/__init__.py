"""hm3jax: hierarchical multi-objective model merging in JAX."""

__version__ = "0.1.0"
