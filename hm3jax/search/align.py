"""Optional dimension alignment at model switches (the paper's CORAL-style affine maps), off by default.

When a path moves from a layer of model a to a layer of model b, the hidden state h it hands over
follows a's statistics, not the ones b's layer was trained on. An affine map h -> A h + c fitted so
that mapped states match b's mean and covariance (CORAL: whitening by a's covariance, re-colouring
by b's) closes that gap. `fit_affine` fits one map from sample states in closed form; `coral_gap`
is the statistics gap it targets (squared mean difference + squared Frobenius covariance
difference, the CORAL loss). Maps are per (source model, target model, layer) and are applied to
a [..., S, D] hidden state by `apply_affine`; AlignConfig.enabled is False by default and the path
forward pass does not call them yet (wiring them into forward_path's scan is left open).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hm3jax.search.env import _require


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Alignment at model switches (config keys under `lower.align.`).

    Attributes:
      enabled: fit and apply maps (off by default: the paper's ablations do not isolate it).
      shrinkage: weight of the identity mixed into each covariance before its inverse square root,
        in [0, 1) (regularises maps fitted from few states).
      eps: floor on covariance eigenvalues.
    """

    enabled: bool = False
    shrinkage: float = 0.1
    eps: float = 1e-5

    def __post_init__(self):
        _require(0.0 <= self.shrinkage < 1.0, "lower.align.shrinkage", "in [0, 1)", self.shrinkage)
        _require(self.eps > 0.0, "lower.align.eps", "> 0", self.eps)


class AffineMap(NamedTuple):
    """h -> h @ A.T + c for hidden states of width D: A [D, D], c [D]."""

    A: jax.Array
    c: jax.Array


def _stats(x: jax.Array):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(x.shape[0] - 1, 1)


def coral_gap(x: jax.Array, y: jax.Array) -> jax.Array:
    """||mean(x) - mean(y)||^2 + ||cov(x) - cov(y)||_F^2 over the last axis of states [..., D]."""
    mx, cx = _stats(x)
    my, cy = _stats(y)
    return jnp.sum((mx - my) ** 2) + jnp.sum((cx - cy) ** 2)


def _sym_pow(c: jax.Array, p: float, eps: float) -> jax.Array:
    w, v = jnp.linalg.eigh(c)
    return (v * jnp.maximum(w, eps) ** p) @ v.T


def fit_affine(cfg: AlignConfig, source: jax.Array, target: jax.Array) -> AffineMap:
    """Closed-form CORAL map taking states like `source` [..., D] to the statistics of `target`."""
    ms, cs = _stats(source)
    mt, ct = _stats(target)
    d = cs.shape[0]
    shrink = lambda c: (1 - cfg.shrinkage) * c + cfg.shrinkage * jnp.trace(c) / d * jnp.eye(d)
    A = _sym_pow(shrink(ct), 0.5, cfg.eps) @ _sym_pow(shrink(cs), -0.5, cfg.eps)
    return AffineMap(A, mt - A @ ms)


def apply_affine(m: AffineMap, h: jax.Array) -> jax.Array:
    return (h.astype(jnp.float32) @ m.A.T + m.c).astype(h.dtype)
