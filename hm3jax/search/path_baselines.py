"""Path-search baselines at the same budget of scored paths as PPO: random and evolutionary search.

Both score `population` paths per iteration on a minibatch of the search split (the same Scorer,
reward and minibatch size as PPO), keep the best path per preference exactly as PPO does (the
chunk's best candidates re-scored on the whole search split) and run vmapped over preferences, a
chunk of iterations per jitted call. The evolutionary search works on index arrays: elitism,
tournament selection, uniform crossover and per-gene mutation to a random action; its first
population is the identity path over the merged model (the upper level's answer) and mutants of it.
Random search draws every step uniformly (never STOP first); its first path is the identity path.
`make_path_search` returns a ppo.Trainer, so `lower.run_lower` drives either (state.params unused).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hm3jax.models.pool import SKIP
from hm3jax.search import env as en
from hm3jax.search.env import PathLayout, Scorer, _require
from hm3jax.search.ppo import ChunkMetrics, Trainer, _raw, _wrap

METHODS = ("random", "evolution")


@dataclasses.dataclass(frozen=True)
class PathSearchConfig:
    """Baseline path search (config keys under `lower.baseline.`).

    Attributes:
      method: "random" or "evolution".
      population: paths scored per iteration (set it to ppo.num_envs for an equal budget).
      iterations, chunk_iterations: as in PPOConfig (iterations a multiple of chunk_iterations).
      elite: best paths carried unchanged into the next generation (evolution).
      tournament: contestants per parent selection (evolution).
      crossover_rate: probability a child is a uniform crossover of two parents (else a copy).
      mutation_rate: per-step probability of replacing the action by a random one.
    """

    method: str = "evolution"
    population: int = 32
    iterations: int = 64
    chunk_iterations: int = 8
    elite: int = 4
    tournament: int = 3
    crossover_rate: float = 0.5
    mutation_rate: float = 0.2

    def __post_init__(self):
        _require(self.method in METHODS, "lower.baseline.method", f"one of {', '.join(METHODS)}", self.method)
        for name in ("population", "iterations", "chunk_iterations", "tournament"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"lower.baseline.{name}", "an integer >= 1", v)
        _require(self.iterations % self.chunk_iterations == 0, "lower.baseline.iterations",
                 f"a multiple of lower.baseline.chunk_iterations={self.chunk_iterations}", self.iterations)
        _require(isinstance(self.elite, int) and 0 <= self.elite < self.population, "lower.baseline.elite",
                 f"an integer in [0, population={self.population})", self.elite)
        for name in ("crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            _require(0.0 <= v <= 1.0, f"lower.baseline.{name}", "in [0, 1]", v)

    @property
    def num_chunks(self) -> int:
        return self.iterations // self.chunk_iterations


class SearchState(NamedTuple):
    population: jax.Array  # int32 [P, T] raw genes (evolution; unused by random search)
    fitness: jax.Array     # [P] minibatch reward of the population
    key: jax.Array
    best: en.BestPaths
    iteration: jax.Array


def canonical(layout: PathLayout, genes: jax.Array) -> jax.Array:
    """Paths from raw genes [..., T]: everything after the first STOP becomes SKIP."""
    stopped = jnp.cumsum(genes == layout.stop_action, axis=-1) - (genes == layout.stop_action)
    return jnp.where(stopped > 0, SKIP, genes).astype(jnp.int32)


def random_genes(layout: PathLayout, key: jax.Array, shape: tuple) -> jax.Array:
    """Uniform actions [*shape, T]; step 0 is never STOP."""
    g = jax.random.randint(key, shape + (layout.t_max,), 0, layout.num_actions)
    first = jax.random.randint(jax.random.fold_in(key, 1), shape, 0, layout.num_layer_actions)
    return g.at[..., 0].set(first).astype(jnp.int32)


def identity_genes(layout: PathLayout) -> jax.Array:
    return layout.identity_action(jnp.arange(layout.t_max)).astype(jnp.int32)


def make_path_search(cfg: PathSearchConfig, env: en.EnvConfig, layout: PathLayout, scorer: Scorer) -> Trainer:
    """A Trainer (init / chunk / train / best; per preference, vmapped over N) for the baseline."""
    P = cfg.population

    def mutate(genes, key):
        k_mask, k_new = jax.random.split(key)
        hit = jax.random.uniform(k_mask, genes.shape) < cfg.mutation_rate
        return jnp.where(hit, random_genes(layout, k_new, genes.shape[:-1]), genes)

    def one_init(key, problem):
        k_run, k_pop = jax.random.split(_wrap(key))
        ident = identity_genes(layout)
        if cfg.method == "evolution":
            pop = mutate(jnp.broadcast_to(ident, (P, layout.t_max)), k_pop).at[0].set(ident)
        else:
            pop = jnp.broadcast_to(ident, (P, layout.t_max))
        best = en.empty_best(layout, problem.preference.shape[-1])
        return SearchState(pop, jnp.full((P,), -jnp.inf), _raw(k_run), best, jnp.zeros((), jnp.int32))

    def next_population(state, key):
        k_sel, k_x, k_mix, k_mut = jax.random.split(key, 4)
        n = P - cfg.elite
        contest = jax.random.randint(k_sel, (2, n, cfg.tournament), 0, P)
        winners = jnp.take_along_axis(contest, jnp.argmax(state.fitness[contest], -1)[..., None], -1)[..., 0]
        a, b = state.population[winners[0]], state.population[winners[1]]
        cross = jax.random.uniform(k_x, (n, 1)) < cfg.crossover_rate
        mix = jax.random.bernoulli(k_mix, 0.5, a.shape)
        children = mutate(jnp.where(cross & mix, b, a), k_mut)
        elite = state.population[jax.lax.top_k(state.fitness, cfg.elite)[1]] if cfg.elite else children[:0]
        return jnp.concatenate([elite, children])

    def iteration(state, problem, data):
        key, k_pop, k_score = jax.random.split(_wrap(state.key), 3)
        first = state.iteration == 0
        if cfg.method == "evolution":
            pop = jnp.where(first, state.population, next_population(state, k_pop))
        else:
            pop = random_genes(layout, k_pop, (P,))
            pop = jnp.where(first, pop.at[0].set(identity_genes(layout)), pop)
        paths = canonical(layout, pop)
        scores, reward = en.score_paths(env, layout, scorer, data, problem, paths, k_score)
        i = jnp.argmax(reward)
        z = jnp.zeros(())
        metrics = ChunkMetrics(reward.mean(), scores.mean(0),
                               en.path_length(layout, paths).mean().astype(jnp.float32), reward[i],
                               z, z, z, (state.iteration + 1) * P)
        new = SearchState(pop, reward, _raw(key), state.best, state.iteration + 1)
        return new, (metrics, paths[i])

    def one_chunk(state, problem, data):
        state, (metrics, cand) = jax.lax.scan(lambda s, _: iteration(s, problem, data), state, None,
                                              length=cfg.chunk_iterations)
        best = en.update_best(env, layout, scorer, data, problem, state.best, cand, metrics.best_reward)
        return state._replace(best=best), metrics

    def init(key, problems):
        return jax.vmap(one_init)(jax.random.split(_wrap(key), problems.preference.shape[0]), problems)

    def chunk(state, problems, data):
        state, m = jax.vmap(one_chunk, in_axes=(0, 0, None))(state, problems, data)
        return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), m)

    def train(key, problems, data):
        return jax.lax.scan(lambda s, _: chunk(s, problems, data), init(key, problems), None,
                            length=cfg.num_chunks)

    return Trainer(jax.jit(init), jax.jit(chunk), jax.jit(train), one_init, one_chunk,
                   lambda state: state.best, None)
