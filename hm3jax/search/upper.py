"""Upper level of HM3: a preference vector λ -> parameter-space merged params.

The paper's way: DARE-TIES with λ as the per-model coefficients, fixed density. Also TA and TIES,
and, optionally, per-preference tuning of (density, scale) by CMA-ES (evosax) minimising the
Tchebycheff value of the merged model's scores. A whole ES population is merged and scored in memory
(vmapped merges, vmapped scoring): no candidate is written to disk.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax import merging
from hm3jax.moo import tchebycheff

UPPER_METHODS = ("task_arithmetic", "ties", "dare_ties")


@dataclasses.dataclass(frozen=True)
class UpperConfig:
    """Parameter-level merge settings (all fields are config keys under `upper.`).

    method: one of UPPER_METHODS; density: kept fraction of each task vector (TIES trim, DARE keep
    probability = 1 - drop rate); scale: mergekit's `lambda` on the merged task vector.
    tune: run CMA-ES per preference over (density, scale) within the given ranges.
    """

    method: str = "dare_ties"
    density: float = 0.7
    scale: float = 1.0
    tune: bool = False
    es_population: int = 8
    es_generations: int = 6
    es_sigma: float = 0.5
    density_range: tuple[float, float] = (0.1, 1.0)
    scale_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self):
        if self.method not in UPPER_METHODS:
            raise ValueError(f"upper.method {self.method!r} is not supported; supported: "
                             f"{', '.join(UPPER_METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"upper.density must be in (0, 1], got {self.density}")
        lo, hi = self.density_range
        if not 0.0 < lo < hi <= 1.0:
            raise ValueError(f"upper.density_range must satisfy 0 < lo < hi <= 1, got {self.density_range}")
        if not 0.0 < self.scale_range[0] < self.scale_range[1]:
            raise ValueError(f"upper.scale_range must satisfy 0 < lo < hi, got {self.scale_range}")
        if self.es_population < 2 or self.es_generations < 1:
            raise ValueError("upper.es_population must be >= 2 and upper.es_generations >= 1")


def merge_for_preference(method: str, base: dict, experts: Sequence[dict], preference: jax.Array,
                         key: jax.Array, density=0.7, scale=1.0) -> dict:
    """Merged params for one preference: λ are the per-model weights of `method`.

    Args:
      method: "task_arithmetic", "ties" or "dare_ties".
      base: params pytree of the shared base; experts: K params pytrees fine-tuned from it.
      preference: [K] weights on the simplex (any non-negative weights are accepted).
      key: PRNG key (DARE's random drop); density, scale: scalars, may be traced (vmappable).
    Returns:
      merged params pytree (the base's dtype).
    """
    preference = jnp.asarray(preference, jnp.float32)
    if method == "task_arithmetic":
        return merging.task_arithmetic(base, experts, preference, **{"lambda": scale})
    if method == "ties":
        # the bisection trim accepts a traced density (the sort trim needs a concrete k)
        return merging.ties(base, experts, preference, density=density, trim="search",
                            **{"lambda": scale})
    if method == "dare_ties":
        return merging.dare_ties(base, experts, preference, key, density=density, **{"lambda": scale})
    raise ValueError(f"method {method!r} is not supported; supported: {', '.join(UPPER_METHODS)}")


class UpperResult(NamedTuple):
    """Outcome of the upper level for one preference."""

    params: dict          # merged params
    density: float
    scale: float
    scores: np.ndarray    # [K] search-split scores of the merged model
    tcheby: float         # its Tchebycheff value (lower is better)
    history: np.ndarray   # [generations] best Tchebycheff value per ES generation (empty untuned)


def _squash(x: jax.Array, lo: float, hi: float) -> jax.Array:
    return lo + (hi - lo) * jax.nn.sigmoid(x)


def _strong(tree):
    """The pytree with every weak type made strong (same dtypes). evosax's init returns a weakly
    typed best_solution/best_fitness and its tell a weakly typed generation_counter, so without this
    the jitted ES generation would be compiled twice (once for the state from init, once for its own)."""
    return jax.tree.map(lambda a: a.astype(a.dtype), tree)


def _unsquash(v: float, lo: float, hi: float) -> float:
    p = min(max((v - lo) / (hi - lo), 1e-3), 1 - 1e-3)
    return float(np.log(p / (1 - p)))


def run_upper(cfg: UpperConfig, base: dict, experts: Sequence[dict], preference, ideal,
              score_fn: Callable[[dict], jax.Array], key: jax.Array) -> UpperResult:
    """Merge for `preference`, tuning (density, scale) by CMA-ES when `cfg.tune`.

    Args:
      score_fn: params -> [K] scores (higher is better), jittable and vmappable, e.g.
        search.baselines.make_scorer: teacher-forced exact match on the search split, or the mean
        answer log-likelihood (objective="loglik"), which stays informative where a merge's exact
        match collapses to ~0.
      ideal: [K] ideal point z* of the Tchebycheff scalarisation (best expert score per task).
      key: PRNG key; the same DARE key is used for every candidate (common random numbers), so the
        ES compares settings, not drop masks.
    """
    pref = jnp.asarray(preference, jnp.float32)
    ideal = jnp.asarray(ideal, jnp.float32)
    k_merge, k_es = jax.random.split(key)

    def evaluate(density, scale):
        params = merge_for_preference(cfg.method, base, experts, pref, k_merge, density, scale)
        s = score_fn(params)
        return s, tchebycheff(s, pref, ideal)

    if not cfg.tune:
        # merge once and score that merge (evaluate() would merge a second time inside its jit)
        params = merge_for_preference(cfg.method, base, experts, pref, k_merge, cfg.density, cfg.scale)
        s = score_fn(params)
        t = tchebycheff(s, pref, ideal)
        return UpperResult(params, cfg.density, cfg.scale, np.asarray(s), float(t), np.zeros(0))

    from evosax.algorithms import CMA_ES  # optional dependency of the tuner only

    (dlo, dhi), (slo, shi) = cfg.density_range, cfg.scale_range
    x0 = jnp.asarray([_unsquash(cfg.density, dlo, dhi), _unsquash(cfg.scale, slo, shi)], jnp.float32)
    es = CMA_ES(population_size=cfg.es_population, solution=x0)
    es_params = es.default_params.replace(std_init=jnp.asarray(cfg.es_sigma, jnp.float32))

    @jax.jit
    def generation(state, k):
        k_ask, k_tell = jax.random.split(k)
        pop, state = es.ask(k_ask, state, es_params)
        dens, scal = _squash(pop[:, 0], dlo, dhi), _squash(pop[:, 1], slo, shi)
        scores, fit = jax.vmap(evaluate)(dens, scal)
        state, _ = es.tell(k_tell, pop, fit, state, es_params)
        best = jnp.argmin(fit)
        return _strong(state), (fit[best], dens[best], scal[best], scores[best])

    # the untuned setting is the incumbent: tuning can only improve on it
    s0, t0 = jax.jit(evaluate)(cfg.density, cfg.scale)
    best = (float(t0), cfg.density, cfg.scale, np.asarray(s0))
    state = _strong(es.init(k_es, x0, es_params))
    history = []
    for k in jax.random.split(k_es, cfg.es_generations):
        state, (f, d, sc, s) = generation(state, k)
        if float(f) < best[0]:
            best = (float(f), float(d), float(sc), np.asarray(s))
        history.append(best[0])
    t, d, sc, s = best
    params = merge_for_preference(cfg.method, base, experts, pref, k_merge, d, sc)
    return UpperResult(params, d, sc, s, t, np.asarray(history))
