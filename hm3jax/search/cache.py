"""A cache of scored paths, so a search's budget counts DISTINCT paths.

Every search of the lower level (PPO, random and evolutionary path search) scores candidates on one
fixed set of search rows, so a path's score never changes: a path sampled again costs nothing. The
cache holds every distinct path scored so far (as the scored layer sequence, so two action sequences
that build the same network are one entry), the genes that first produced it (the searcher's own
actions, for imitation), its per-task scores and its reward. It is a fixed-size array table with a
linear scan: lookups are [B, C] comparisons, cheap next to one scoring forward at the sizes a search
budget allows (C <= a few thousand paths).

    cache = empty(capacity, T, K)
    pick, fresh = select_new(cache, paths, n)       # up to n distinct paths not in the cache
    cache = insert(cache, genes[pick], paths[pick], scores, reward, fresh)
    hit, scores, reward = lookup(cache, paths)      # every sampled path now scored or not
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PathCache(NamedTuple):
    """Scored distinct paths of one preference ([C, ...] per field; `count` entries filled)."""

    genes: jax.Array    # int32 [C, T] the searcher's actions that first built the path
    paths: jax.Array    # int32 [C, T] local layer actions, SKIP after the end (the scored network)
    scores: jax.Array   # [C, K]
    reward: jax.Array   # [C] (-inf where empty)
    count: jax.Array    # int32 [] entries filled = distinct paths scored


def empty(capacity: int, t_max: int, num_objectives: int) -> PathCache:
    return PathCache(jnp.full((capacity, t_max), -1, jnp.int32), jnp.full((capacity, t_max), -2, jnp.int32),
                     jnp.zeros((capacity, num_objectives), jnp.float32),
                     jnp.full((capacity,), -jnp.inf, jnp.float32), jnp.zeros((), jnp.int32))


def _match(cache: PathCache, paths: jax.Array) -> jax.Array:
    """bool [B, C]: path b equals filled entry c."""
    filled = jnp.arange(cache.paths.shape[0]) < cache.count
    return jnp.all(paths[:, None, :] == cache.paths[None, :, :], axis=-1) & filled[None, :]


def lookup(cache: PathCache, paths: jax.Array):
    """(hit bool [B], scores [B, K], reward [B]) of `paths` [B, T]; zeros / -inf where not cached."""
    m = _match(cache, paths)
    hit = m.any(-1)
    i = jnp.argmax(m, -1)
    return hit, jnp.where(hit[:, None], cache.scores[i], 0.0), jnp.where(hit, cache.reward[i], -jnp.inf)


def first_occurrence(paths: jax.Array) -> jax.Array:
    """bool [B]: path b does not equal any earlier path of the batch."""
    same = jnp.all(paths[:, None, :] == paths[None, :, :], axis=-1)
    earlier = jnp.tril(jnp.ones(same.shape, bool), k=-1)
    return ~jnp.any(same & earlier, axis=-1)


def select_new(cache: PathCache, paths: jax.Array, n: int, room: jax.Array | None = None):
    """Indices [n] into `paths` [B, T] of up to n distinct paths not yet cached (batch order), and
    bool [n] marking the slots that hold one (the rest repeat index 0 and must not be counted).
    `room` caps how many are taken (e.g. the budget left); default the cache's free entries."""
    hit, _, _ = lookup(cache, paths)
    new = ~hit & first_occurrence(paths)
    order = jnp.argsort(~new, stable=True)  # new paths first, in batch order
    pick = order[:n]
    cap = cache.paths.shape[0] - cache.count if room is None else jnp.minimum(room, cache.paths.shape[0] - cache.count)
    fresh = new[pick] & (jnp.arange(n) < cap)
    return jnp.where(fresh, pick, 0), fresh


def insert(cache: PathCache, genes: jax.Array, paths: jax.Array, scores: jax.Array, reward: jax.Array,
           fresh: jax.Array) -> PathCache:
    """The cache with the `fresh` rows of (genes, paths, scores, reward) [n, ...] appended."""
    slot = cache.count + jnp.cumsum(fresh) - 1
    slot = jnp.where(fresh, slot, cache.paths.shape[0])  # out of range: dropped
    put = lambda table, rows: table.at[slot].set(rows, mode="drop")
    return PathCache(put(cache.genes, genes), put(cache.paths, paths), put(cache.scores, scores),
                     put(cache.reward, reward), cache.count + jnp.sum(fresh).astype(jnp.int32))


def top(cache: PathCache, n: int):
    """(genes [n, T], paths [n, T], reward [n], valid [n]) of the n best cached paths by reward."""
    r, i = jax.lax.top_k(cache.reward, n)
    return cache.genes[i], cache.paths[i], r, jnp.isfinite(r)
