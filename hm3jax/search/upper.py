"""Upper level of HM3: a preference vector λ -> parameter-space merged params.

The paper's way: DARE-TIES with λ as the per-model coefficients, fixed density. Also TA and TIES,
and, optionally, per-preference tuning of (density, scale) by CMA-ES (evosax) minimising the
Tchebycheff value of the merged model's scores. A whole ES population is merged and scored in memory
(vmapped merges, vmapped scoring): no candidate is written to disk. The ES is one pure program (a
`lax.scan` over generations), so `run_upper_many` runs N preferences as one vmapped program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax import merging
from hm3jax.moo import tchebycheff
from hm3jax.settings import AUTO, UPPER_METHODS, UpperConfig


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
        return merging.dare_ties(base, experts, preference, key=key, density=density, **{"lambda": scale})
    raise ValueError(f"method {method!r} is not supported; supported: {', '.join(UPPER_METHODS)}")


class UpperResult(NamedTuple):
    """Outcome of the upper level for one preference."""

    params: dict          # merged params
    density: float
    scale: float
    scores: np.ndarray    # [K] search-split scores of the merged model
    tcheby: float         # its Tchebycheff value (lower is better)
    history: np.ndarray   # [generations] best Tchebycheff value per ES generation (empty untuned)
    method: int = 0       # index into UPPER_METHODS of the method used (the pick under "auto")


def methods_of(cfg: UpperConfig) -> tuple[str, ...]:
    """The methods an upper level of `cfg` merges with (all of UPPER_METHODS under "auto")."""
    return UPPER_METHODS if cfg.method == AUTO else (cfg.method,)


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


def _tune(cfg: UpperConfig, base: dict, experts: Sequence[dict], score_fn, pref, ideal, key):
    """CMA-ES over (density, scale) for one preference as ONE pure program (a scan over generations).

    Returns (density [], scale [], scores [K], tcheby [], history [generations]) of the best setting
    found, the untuned (cfg.density, cfg.scale) being the incumbent; jittable and vmappable over
    (pref, ideal, key). Keys: merge (shared by every candidate), ES init, and one per generation,
    all split from `key` (none is used twice).
    """
    # evosax loads only when upper.tune is on
    from evosax.algorithms import CMA_ES  # optional dependency of the tuner only

    k_merge, k_init, k_gens = jax.random.split(key, 3)
    (dlo, dhi), (slo, shi) = cfg.density_range, cfg.scale_range
    x0 = jnp.asarray([_unsquash(cfg.density, dlo, dhi), _unsquash(cfg.scale, slo, shi)], jnp.float32)
    es = CMA_ES(population_size=cfg.es_population, solution=x0)
    es_params = es.default_params.replace(std_init=jnp.asarray(cfg.es_sigma, jnp.float32))

    def evaluate(density, scale):
        params = merge_for_preference(cfg.method, base, experts, pref, k_merge, density, scale)
        s = score_fn(params)
        return s, tchebycheff(s, pref, ideal)

    d0, sc0 = jnp.asarray(cfg.density, jnp.float32), jnp.asarray(cfg.scale, jnp.float32)
    s0, t0 = evaluate(d0, sc0)
    best0 = _strong((t0, d0, sc0, s0))

    def generation(carry, k):
        state, best = carry
        k_ask, k_tell = jax.random.split(k)
        pop, state = es.ask(k_ask, state, es_params)
        dens, scal = _squash(pop[:, 0], dlo, dhi), _squash(pop[:, 1], slo, shi)
        scores, fit = jax.vmap(evaluate)(dens, scal)
        state, _ = es.tell(k_tell, pop, fit, state, es_params)
        i = jnp.argmin(fit)
        new = (fit[i], dens[i], scal[i], scores[i])
        best = jax.tree.map(lambda n, o: jnp.where(fit[i] < best[0], n, o), new, best)
        return (_strong(state), _strong(best)), best[0]

    state = _strong(es.init(k_init, x0, es_params))
    (_, (t, d, sc, s)), history = jax.lax.scan(generation, (state, best0),
                                              jax.random.split(k_gens, cfg.es_generations))
    return d, sc, s, t, history


def dare_key(key: jax.Array) -> jax.Array:
    """The key a preference's merge draws its DARE masks with, derived from that preference's
    upper-level key (run_upper's `key`; CMA-ES draws from the same key's other splits)."""
    return jax.random.split(key, 3)[0]


def run_upper(cfg: UpperConfig, base: dict, experts: Sequence[dict], preference, ideal,
              score_fn: Callable[[dict], jax.Array], key: jax.Array) -> UpperResult:
    """Merge for `preference`, tuning (density, scale) by CMA-ES when `cfg.tune` and picking the
    method when `cfg.method` is "auto".

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
    k_merge = dare_key(key)
    results = []
    for method in methods_of(cfg):
        c = dataclasses.replace(cfg, method=method)
        if not cfg.tune:
            params = merge_for_preference(method, base, experts, pref, k_merge, cfg.density, cfg.scale)
            s = score_fn(params)
            t = tchebycheff(s, pref, ideal)
            results.append(UpperResult(params, cfg.density, cfg.scale, np.asarray(s), float(t), np.zeros(0),
                                       UPPER_METHODS.index(method)))
            continue
        d, sc, s, t, history = jax.jit(lambda p, z, k, c=c: _tune(c, base, experts, score_fn, p, z, k))(
            pref, ideal, key)
        d, sc = float(d), float(sc)
        params = merge_for_preference(method, base, experts, pref, k_merge, d, sc)
        results.append(UpperResult(params, d, sc, np.asarray(s), float(t), np.asarray(history),
                                   UPPER_METHODS.index(method)))
    return min(results, key=lambda r: r.tcheby)  # ties: the first in UPPER_METHODS order


def run_upper_many(cfg: UpperConfig, base: dict, experts: Sequence[dict], preferences, ideal,
                   score_fn: Callable[[dict], jax.Array], key: jax.Array, with_params: bool = True) -> UpperResult:
    """run_upper for N preferences as one vmapped program (tuning and the "auto" pick included).

    Args: as run_upper, with preferences [N, K]; ideal [K] (shared) or [N, K]. Preference i uses
    jax.random.split(key, N)[i], so row i equals run_upper(..., preferences[i], ..., that key).
      with_params: False leaves the merged params out (params None), for callers that merge each
        preference themselves from the settings returned (merge_for_preference with dare_key of
        its key): the program then merges only what it scores.
    Returns:
      UpperResult whose fields carry a leading [N] axis: params (stacked merged params, or None),
      density, scale, tcheby, history and method as arrays, scores [N, K].
    """
    prefs = jnp.asarray(preferences, jnp.float32)
    n = prefs.shape[0]
    ideal = jnp.broadcast_to(jnp.asarray(ideal, jnp.float32), prefs.shape)
    keys = jax.random.split(key, n)
    methods = methods_of(cfg)

    @jax.jit
    def many(prefs, ideal, keys):
        def one_method(method, pref, z, k):
            c = dataclasses.replace(cfg, method=method)
            if cfg.tune:
                d, sc, s, t, h = _tune(c, base, experts, score_fn, pref, z, k)
            else:
                d, sc = jnp.asarray(cfg.density, jnp.float32), jnp.asarray(cfg.scale, jnp.float32)
                params = merge_for_preference(method, base, experts, pref, dare_key(k), d, sc)
                s = score_fn(params)
                t, h = tchebycheff(s, pref, z), jnp.zeros((0,), jnp.float32)
            return d, sc, s, t, h

        def one(pref, z, k):
            outs = [one_method(m, pref, z, k) for m in methods]
            stack = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
            i = jnp.argmin(stack[3])  # the first of equal values, as run_upper
            d, sc, s, t, h = jax.tree.map(lambda x: x[i], stack)
            method = jnp.asarray([UPPER_METHODS.index(m) for m in methods])[i]
            if not with_params:
                return None, d, sc, s, t, h, method
            merges = [merge_for_preference(m, base, experts, pref, dare_key(k), d, sc) for m in methods]
            params = jax.tree.map(lambda *xs: jnp.stack(xs)[i], *merges) if len(methods) > 1 else merges[0]
            return params, d, sc, s, t, h, method

        return jax.vmap(one)(prefs, ideal, keys)

    params, d, sc, s, t, h, m = many(prefs, ideal, keys)
    return UpperResult(params, np.asarray(d), np.asarray(sc), np.asarray(s), np.asarray(t), np.asarray(h),
                       np.asarray(m))
