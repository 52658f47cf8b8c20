"""What every searcher of layer paths is, in optax's spirit: a few pure functions over a state.

A searcher (`ppo.make_train`, `path_baselines.make_path_search`, or one of your own) is any object
with these functions (the `Searcher` protocol; `Trainer` is the record both built-in searchers
return), for N preferences, C = the iterations of one chunk, T = the longest path (layout.t_max) and
K = the number of objectives (experts):

    state = searcher.init(key, problems)                 # problems: PathProblem [N]
    state, metrics = searcher.chunk(state, problems, data)   # metrics: ChunkMetrics [C, N, ...]
    best = searcher.best(state)                          # BestPaths [N]: path [N, T], scores [N, K]

`init` and `chunk` are pure (jitted, no host callbacks), so the same key gives the same search and
`lower.run_lower`, the only Python loop, can checkpoint the state between chunks and resume.
A searcher's state holds its PRNG key as raw uint32 key data (`raw_key` / `wrap_key`: orbax stores
plain arrays). The config sections of the searchers validate their fields with `require`, the one
validation idiom of the run config (it lives in `hm3jax.settings`, which loads before JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from hm3jax.settings import require

__all__ = ["ChunkMetrics", "Searcher", "Trainer", "raw_key", "require", "wrap_key"]


class ChunkMetrics(NamedTuple):
    """What a searcher reports of each iteration of a chunk, per preference: [C, N] per field
    (scores [C, N, K]) from `chunk`. A searcher without an agent reports 0 for entropy, approx_kl
    and value_loss."""

    reward: jax.Array         # mean search-row reward of the iteration's scored paths
    scores: jax.Array         # [C, N, K] mean search-row scores of the iteration's scored paths
    length: jax.Array         # mean path length (layers)
    best_reward: jax.Array    # best search-row reward found so far
    entropy: jax.Array
    approx_kl: jax.Array
    value_loss: jax.Array
    paths_scored: jax.Array   # distinct paths scored so far (per preference): the budget spent


class Searcher(Protocol):
    """The protocol every searcher implements (checked structurally; nothing to inherit).

    init(key, problems) -> state: key a typed PRNG key or raw key data, problems PathProblem [N].
    chunk(state, problems, data) -> (state, ChunkMetrics [C, N]): `chunk_iterations` iterations;
      data is the scorer's (search.lower.SearchData, or None for a scorer without data). Jitted,
      so `run_lower` may compile it ahead (`chunk.lower(...).compile()`).
    best(state) -> BestPaths [N]: each preference's answer, scored on the whole search split.
    A searcher may also have `finish(state, problems, data) -> state` (None or absent: nothing to
    do), which `run_lower` calls once after the last chunk to set the best paths.
    """

    init: Callable[..., Any]
    chunk: Callable[..., Any]
    best: Callable[[Any], Any]


class Trainer(NamedTuple):
    """The pure functions of one search configuration: a `Searcher` and more.

    init(key, problems [N]) -> state; chunk(state, problems, data) -> (state, ChunkMetrics [C, N]),
    jitted; train(key, problems, data) -> (state, ChunkMetrics [chunks, C, N]), jitted, every chunk
    in one program; group_init / group_chunk: the same for one agent and its G preferences, unjitted
    (per_preference mode vmaps them over N; the path baselines: one preference, no leading axis);
    best(state) -> BestPaths [N]; sample(params, problems [G], key) -> Trajectory [G, num_envs, T]
    of one agent's paths (params of one agent); greedy(params, problems [G]) -> genes [G, T], the
    agent's most likely path per preference; finish(state, problems, data) -> state whose best
    paths are set (the cache's best and the identity path re-scored on the whole search split: see
    ppo.finish_best), jitted, once at the end. sample and greedy are None for searchers without
    an agent.
    """

    init: Callable
    chunk: Callable
    train: Callable
    group_init: Callable
    group_chunk: Callable
    best: Callable
    sample: Callable | None
    greedy: Callable | None = None
    finish: Callable | None = None


def raw_key(key: jax.Array) -> jax.Array:
    """Raw uint32 key data of a typed key (a raw key as it is): what a searcher keeps in its state,
    since orbax stores plain arrays."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def wrap_key(key: jax.Array) -> jax.Array:
    """A typed key from raw uint32 key data or a typed key (the inverse of raw_key)."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
