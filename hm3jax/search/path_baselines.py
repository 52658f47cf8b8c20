"""Path-search baselines at the same budget of DISTINCT scored paths as PPO: random and evolutionary.

Both run in the layout's action space (free or edit), score candidates on the same search rows with
the same reward as PPO, keep every distinct scored path in a path cache (search.cache: a path drawn
again is not scored again and costs nothing), score at most `population` new distinct paths per
iteration, keep the best path per preference exactly as PPO does (at the end, the cache's best and
the identity path re-scored on the whole search split) and run vmapped over preferences, a chunk of iterations per
jitted call.

- Random search draws `candidates` uniform gene sequences per iteration (never STOP first) and scores
  the first `population` new ones; its first path is the identity path (the upper level's answer).
- Evolutionary search is a (mu + lambda) genetic algorithm over the cache: parents are picked by
  tournament among the `parents` best paths scored so far, children by uniform crossover and per-gene
  mutation to a random gene; `candidates` children are drawn and the first `population` new ones are
  scored. Its first generation is the identity path and mutants of it.
`make_path_search` returns a search.base.Trainer (a Searcher: init, chunk, best), so
`lower.run_lower` drives either.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hm3jax.search import cache as pc
from hm3jax.search import env as en
from hm3jax.search.base import ChunkMetrics, Trainer, raw_key, require, wrap_key
from hm3jax.search.env import PathLayout, Scorer
from hm3jax.search.ppo import evaluate_batch, finish_best

METHODS = ("random", "evolution")


@dataclasses.dataclass(frozen=True)
class PathSearchConfig:
    """Baseline path search (config keys under `lower.baseline.`).

    Attributes:
      method: "random" or "evolution".
      population: most distinct new paths scored per iteration (set it to PPO's new_paths for an
        equal budget).
      candidates: gene sequences drawn per iteration, of which the first `population` new ones are
        scored (None: 4 x population); duplicates of scored paths cost nothing.
      iterations, chunk_iterations: as in PPOConfig (iterations a multiple of chunk_iterations).
      parents: best paths so far that parents are drawn from (evolution; None: population).
      tournament: contestants per parent selection (evolution).
      crossover_rate: probability a child is a uniform crossover of two parents (else a copy).
      mutation_rate: per-step probability of replacing the action by a random one.
    """

    method: str = "evolution"
    population: int = 32
    candidates: int | None = None
    iterations: int = 64
    chunk_iterations: int = 8
    parents: int | None = None
    tournament: int = 3
    crossover_rate: float = 0.5
    mutation_rate: float = 0.2

    def __post_init__(self):
        require(self.method in METHODS, "lower.baseline.method", f"one of {', '.join(METHODS)}", self.method)
        for name in ("population", "iterations", "chunk_iterations", "tournament"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"lower.baseline.{name}", "an integer >= 1", v)
        require(self.candidates is None or (isinstance(self.candidates, int) and self.candidates >= self.population),
                 "lower.baseline.candidates", f"None or an integer >= population={self.population}", self.candidates)
        require(self.parents is None or (isinstance(self.parents, int) and self.parents >= 1),
                 "lower.baseline.parents", "None or an integer >= 1", self.parents)
        require(self.iterations % self.chunk_iterations == 0, "lower.baseline.iterations",
                 f"a multiple of lower.baseline.chunk_iterations={self.chunk_iterations}", self.iterations)
        for name in ("crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"lower.baseline.{name}", "in [0, 1]", v)

    @property
    def num_chunks(self) -> int:
        return self.iterations // self.chunk_iterations

    @property
    def num_candidates(self) -> int:
        return self.candidates or 4 * self.population

    @property
    def budget(self) -> int:
        return self.iterations * self.population


class SearchState(NamedTuple):
    key: jax.Array
    best: en.BestPaths
    iteration: jax.Array
    cache: pc.PathCache


def canonical(layout: PathLayout, genes: jax.Array) -> jax.Array:
    """Paths from raw genes [..., T] (see env.decode)."""
    return en.decode(layout, genes)


def random_genes(layout: PathLayout, key: jax.Array, shape: tuple) -> jax.Array:
    """Uniform genes [*shape, T]; step 0 is never STOP (free actions)."""
    g = jax.random.randint(key, shape + (layout.t_max,), 0, layout.num_genes)
    if layout.edit:
        return g.astype(jnp.int32)
    first = jax.random.randint(jax.random.fold_in(key, 1), shape, 0, layout.num_layer_actions)
    return g.at[..., 0].set(first).astype(jnp.int32)


def identity_genes(layout: PathLayout) -> jax.Array:
    return layout.identity_gene(jnp.arange(layout.t_max)).astype(jnp.int32)


def make_path_search(cfg: PathSearchConfig, env: en.EnvConfig, layout: PathLayout, scorer: Scorer) -> Trainer:
    """A Trainer (init / chunk / train / best / finish; per preference, vmapped over N) for the
    baseline; group_init / group_chunk are one preference's (no leading axis), sample and greedy
    None (no agent)."""
    P, S = cfg.population, cfg.num_candidates
    n_parents = min(cfg.parents or P, cfg.budget)

    def mutate(genes, key):
        k_mask, k_new = jax.random.split(key)
        hit = jax.random.uniform(k_mask, genes.shape) < cfg.mutation_rate
        return jnp.where(hit, random_genes(layout, k_new, genes.shape[:-1]), genes)

    def one_init(key, problem):
        K = problem.preference.shape[-1]
        best = en.empty_best(layout, K)
        return SearchState(raw_key(wrap_key(key)), best, jnp.zeros((), jnp.int32), pc.empty(cfg.budget, layout.t_max, K))

    def children(state, key):
        k_sel, k_x, k_mix, k_mut = jax.random.split(key, 4)
        genes, _, reward, _ = pc.top(state.cache, n_parents)
        contest = jax.random.randint(k_sel, (2, S, cfg.tournament), 0, n_parents)
        winners = jnp.take_along_axis(contest, jnp.argmax(reward[contest], -1)[..., None], -1)[..., 0]
        a, b = genes[winners[0]], genes[winners[1]]
        cross = jax.random.uniform(k_x, (S, 1)) < cfg.crossover_rate
        mix = jax.random.bernoulli(k_mix, 0.5, a.shape)
        return mutate(jnp.where(cross & mix, b, a), k_mut)

    def first_generation(key):
        ident = jnp.broadcast_to(identity_genes(layout), (S, layout.t_max))
        if cfg.method == "evolution":
            return mutate(ident, key).at[0].set(ident[0])
        return random_genes(layout, key, (S,)).at[0].set(ident[0])

    def iteration(state, problem, data):
        key, k_pop = jax.random.split(wrap_key(state.key))
        if cfg.method == "evolution":
            nxt = children(state, k_pop)
        else:
            nxt = random_genes(layout, k_pop, (S,))
        genes = jnp.where(state.iteration == 0, first_generation(k_pop), nxt)
        cache, scored, scores, reward, paths = evaluate_batch(env, layout, scorer, data, problem, state.cache,
                                                              genes, P)
        w = scored.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        z = jnp.zeros(())
        metrics = ChunkMetrics(jnp.sum(jnp.where(scored, reward, 0.0)) / n, jnp.sum(scores * w[:, None], 0) / n,
                               jnp.sum(en.path_length(layout, paths) * w) / n, jnp.max(cache.reward),
                               z, z, z, cache.count)
        return SearchState(raw_key(key), state.best, state.iteration + 1, cache), metrics

    def one_chunk(state, problem, data):
        return jax.lax.scan(lambda s, _: iteration(s, problem, data), state, None, length=cfg.chunk_iterations)

    def finish(state, problems, data):
        best = jax.vmap(lambda p, b, c: finish_best(env, layout, scorer, data, p, b, c))(
            problems, state.best, state.cache)
        return state._replace(best=best)

    def init(key, problems):
        return jax.vmap(one_init)(jax.random.split(wrap_key(key), problems.preference.shape[0]), problems)

    def chunk(state, problems, data):
        state, m = jax.vmap(one_chunk, in_axes=(0, 0, None))(state, problems, data)
        if env.rescore_each_chunk:  # the racing answer, as in ppo.make_train
            state = finish(state, problems, data)
        return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), m)

    def train(key, problems, data):
        state, m = jax.lax.scan(lambda s, _: chunk(s, problems, data), init(key, problems), None,
                                length=cfg.num_chunks)
        return finish(state, problems, data), m

    return Trainer(jax.jit(init), jax.jit(chunk), jax.jit(train), one_init, one_chunk,
                   lambda state: state.best, None, None, jax.jit(finish))
