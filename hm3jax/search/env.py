"""The lower level's MDP (HM3's layer-path search) as pure functions.

For one preference λ the *local* layer actions are every layer of the K experts, then every layer of
that preference's merged model; a scored path is a sequence of them (SKIP after its end):

    local a in [0, K·L)          expert a // L, layer a % L
    local a in [K·L, (K+1)·L)    the merged model's layer a - K·L
    local a == (K+1)·L           STOP (only when EnvConfig.stop, free actions)

The searchers act in one of two action spaces (EnvConfig.actions), their actions ("genes") decoded
into a local path by `decode`:
- "free" (the paper's construction): each step picks any local layer action or STOP;
- "edit" (relative to the upper level's answer): one step per position t of the merged model, each
  picking `keep` (the merge's layer t), `expert k` (expert k's layer t), `skip` (no layer) or
  `repeat` (the layer taken last, once more). The all-keep path is the merge itself, and the
  (K+3)^L edit paths are the small changes of it that pay on a family of fine-tunes of one base.

The *global* pool that scores paths holds the K·L expert layers once and then one block of L merged
layers per preference (block i of N), so preferences share the expert layers; `to_global` maps a
local path into it. State = the path so far; a step appends a layer; an episode ends at STOP or after
T_max steps. The reward is computed once the path is complete (one scoring forward for a whole batch
of paths), at the end of the episode or spread evenly over its steps.

`Scorer` is the only contact with a model: scores of a batch of global paths on a random minibatch of
the search split (rollouts) or on the whole search split (best paths). Tests plug in synthetic ones.
The minibatch may use another per-task score than the whole split (EnvConfig.search_score, e.g. the
answer's probability where the objective is exact match); its reward then uses the problem's
`search_ideal`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hm3jax.models.pool import SKIP
from hm3jax.moo import tchebycheff
from hm3jax.settings import ACTIONS, REWARD_TIMINGS, REWARDS, EnvConfig  # noqa: F401


@dataclasses.dataclass(frozen=True)
class PathLayout:
    """Static shape of the action set: K experts of L layers each, T_max steps, STOP or not, and the
    searchers' action space ("free" or "edit", see the module docstring)."""

    num_experts: int
    num_layers: int
    t_max: int
    stop: bool
    actions: str = "free"

    @classmethod
    def make(cls, cfg: EnvConfig, num_experts: int, num_layers: int) -> PathLayout:
        if cfg.actions == "edit":
            return cls(num_experts, num_layers, num_layers, False, "edit")
        return cls(num_experts, num_layers, cfg.t_max or num_layers, cfg.stop)

    @property
    def edit(self) -> bool:
        return self.actions == "edit"

    @property
    def num_genes(self) -> int:
        """Actions a searcher picks from at each step (free: num_actions; edit: keep, K experts,
        skip, repeat)."""
        return self.num_experts + 3 if self.edit else self.num_actions

    @property
    def keep_gene(self) -> int:
        return 0

    @property
    def skip_gene(self) -> int:
        return self.num_experts + 1

    @property
    def repeat_gene(self) -> int:
        return self.num_experts + 2

    @property
    def merged_start(self) -> int:
        return self.num_experts * self.num_layers

    @property
    def num_layer_actions(self) -> int:
        return (self.num_experts + 1) * self.num_layers

    @property
    def num_actions(self) -> int:
        return self.num_layer_actions + int(self.stop)

    @property
    def stop_action(self) -> int:
        """Index of STOP (== num_layer_actions; an index no action takes when stop is off)."""
        return self.num_layer_actions

    def model_of(self, a: jax.Array) -> jax.Array:
        """Model id of local actions: 0..K-1 experts, K the merged model, K+1 STOP."""
        return jnp.minimum(a // self.num_layers, self.num_experts + 1)

    def layer_of(self, a: jax.Array) -> jax.Array:
        return jnp.where(a >= self.num_layer_actions, 0, a % self.num_layers)

    def identity_action(self, t: jax.Array) -> jax.Array:
        """The upper level's answer as a path: merged layer t for t < L, then STOP (or layer L-1)."""
        after = self.stop_action if self.stop else self.num_layer_actions - 1
        return jnp.where(t < self.num_layers, self.merged_start + t, after)

    def identity_gene(self, t: jax.Array) -> jax.Array:
        """The searchers' action building the upper level's answer at step t (edit: keep)."""
        if self.edit:
            return jnp.zeros_like(jnp.asarray(t), jnp.int32)
        return self.identity_action(t)

    def stop_gene(self) -> int:
        """The gene that ends a path (an index no gene takes in the edit space)."""
        return -100 if self.edit else self.stop_action


class PathProblem(NamedTuple):
    """What differs between preferences (arrays; a leading [N] axis when batched).

    preference: [K] λ; ideal: [K] z* of the Tchebycheff reward; block: int32 [] index of this
    preference's merged block in the global pool; summary: [(K+1)·L, S] fixed per-layer weight
    statistics of the local layer actions (experts, then this preference's merged model);
    search_ideal: [K] z* of the reward on the search rows where they are scored by another score
    than the objective (EnvConfig.search_score), None where they are not.
    """

    preference: jax.Array
    ideal: jax.Array
    block: jax.Array
    summary: jax.Array
    search_ideal: jax.Array | None = None


class Scorer(NamedTuple):
    """Scores of global paths (higher is better), both pure and vmappable.

    minibatch(data, paths [B, T], block [], key) -> [B, K] on a random minibatch of the search split
      (fresh per key); block picks the preference's shell (embeddings / head) where that matters.
    full(data, paths [B, T], block []) -> [B, K] on the whole search split.
    """

    minibatch: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    full: Callable[[Any, jax.Array, jax.Array], jax.Array]


class BestPaths(NamedTuple):
    """Best path found so far for one preference, scored on the whole search split."""

    path: jax.Array      # int32 [T_max] local actions, SKIP after the end (STOP kept)
    scores: jax.Array    # [K]
    reward: jax.Array    # [] terminal reward (scalarised score - β1·length)
    tcheby: jax.Array    # [] Tchebycheff value of `scores` (lower is better)


def layer_mask(layout: PathLayout, path: jax.Array) -> jax.Array:
    """bool [..., T]: steps of `path` (local actions, SKIP after the end) that run a layer."""
    return (path >= 0) & (path < layout.num_layer_actions)


def path_length(layout: PathLayout, path: jax.Array) -> jax.Array:
    """Number of layers the local path runs (STOP and SKIP steps excluded)."""
    return jnp.sum(layer_mask(layout, path), axis=-1)


def to_global(layout: PathLayout, path: jax.Array, block: jax.Array) -> jax.Array:
    """Local actions -> global pool indices (SKIP for STOP and for steps after the end)."""
    merged = path >= layout.merged_start
    shift = block * layout.num_layers
    return jnp.where(layer_mask(layout, path), jnp.where(merged, path + shift, path), SKIP).astype(jnp.int32)


def edit_step(layout: PathLayout, gene: jax.Array, t: jax.Array, last: jax.Array):
    """(local action or SKIP, new last layer) of edit gene `gene` at position t; `last` is the
    local action of the last layer taken (SKIP before any)."""
    L, K = layout.num_layers, layout.num_experts
    layer = jnp.where(gene == layout.keep_gene, layout.merged_start + t, (gene - 1) * L + t)
    local = jnp.where(gene == layout.skip_gene, SKIP, jnp.where(gene == layout.repeat_gene, last, layer))
    local = jnp.where((gene >= 0) & (gene <= K + 2), local, SKIP)
    return local.astype(jnp.int32), jnp.where(local >= 0, local, last).astype(jnp.int32)


def compact(path: jax.Array) -> jax.Array:
    """Layers of `path` [..., T] moved to the front in order, SKIP after them (the same network)."""
    order = jnp.argsort(path < 0, axis=-1, stable=True)
    return jnp.take_along_axis(path, order, axis=-1)


def decode(layout: PathLayout, genes: jax.Array) -> jax.Array:
    """Local paths [..., T] (layers first, SKIP after the end) of the searchers' genes [..., T]:
    free genes end at the first STOP; edit genes are mapped position by position and compacted."""
    if not layout.edit:
        stop = layout.stop_action
        stopped = jnp.cumsum(genes == stop, axis=-1) - (genes == stop)
        return compact(jnp.where((stopped > 0) | (genes < 0), SKIP, genes).astype(jnp.int32))

    def one(g):
        def step(last, x):
            gene, t = x
            local, last = edit_step(layout, gene, t, last)
            return last, local

        _, local = jax.lax.scan(step, jnp.asarray(SKIP, jnp.int32), (g, jnp.arange(layout.t_max)))
        return compact(local)

    flat = genes.reshape(-1, genes.shape[-1])
    return jax.vmap(one)(flat).reshape(genes.shape)


def initial_path(layout: PathLayout) -> jax.Array:
    return jnp.full((layout.t_max,), SKIP, jnp.int32)


def append(layout: PathLayout, path: jax.Array, t: jax.Array, action: jax.Array, done: jax.Array):
    """One environment step: (path, done) after taking `action` at step t (a no-op once done)."""
    path = jnp.where(done, path, path.at[t].set(action))
    now_done = done | (action == layout.stop_gene()) | (t + 1 >= layout.t_max)
    return path, now_done


def terminal_reward(cfg: EnvConfig, scores: jax.Array, problem: PathProblem, length: jax.Array,
                    search_rows: bool = False) -> jax.Array:
    """R for paths of `scores` [..., K] and `length` [...] layers under problem's λ (and z*: the
    search rows' own where `search_rows` and the problem has one)."""
    if cfg.reward == "weighted_sum":
        value = jnp.sum(scores * problem.preference, axis=-1)
    else:
        ideal = problem.search_ideal if search_rows and problem.search_ideal is not None else problem.ideal
        value = -tchebycheff(scores, problem.preference, ideal)
    return value - cfg.length_penalty * length


def step_rewards(cfg: EnvConfig, reward: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-step rewards [..., T] for episodes with terminal `reward` [...] over `valid` steps [..., T]."""
    n = jnp.maximum(valid.sum(-1, keepdims=True), 1)
    if cfg.reward_timing == "spread":
        return jnp.where(valid, reward[..., None] / n, 0.0)
    last = jnp.arange(valid.shape[-1]) == (n - 1)
    return jnp.where(last & valid, reward[..., None], 0.0)


def score_paths(cfg: EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                paths: jax.Array, key: jax.Array | None):
    """(scores [B, K], reward [B]) of local paths [B, T]; key None scores on the whole search split."""
    g = to_global(layout, paths, problem.block)
    if key is None:
        scores = scorer.full(data, g, problem.block)
    else:
        scores = scorer.minibatch(data, g, problem.block, key)
    return scores, terminal_reward(cfg, scores, problem, path_length(layout, paths), key is not None)


# The search rows: one fixed stratified draw of the search split for every path a search scores.
_ROWS_SEED = 0


def score_search_rows(cfg: EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                      paths: jax.Array):
    """(scores [B, K], reward [B]) of local paths [B, T] on the search rows (the same rows for every
    call and every search, so scores are deterministic and cacheable)."""
    return score_paths(cfg, layout, scorer, data, problem, paths, jax.random.key(_ROWS_SEED))


def empty_best(layout: PathLayout, num_objectives: int) -> BestPaths:
    """A BestPaths that any scored path beats (reward -inf)."""
    return BestPaths(initial_path(layout), jnp.zeros((num_objectives,), jnp.float32),
                     jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(jnp.inf, jnp.float32))


def update_best(cfg: EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                best: BestPaths, candidates: jax.Array, candidate_reward: jax.Array) -> BestPaths:
    """Re-score the `rescore_top` best `candidates` [C, T] (by minibatch reward [C]) on the whole
    search split and keep the best of them and `best` (ties keep `best`)."""
    top = min(cfg.rescore_top, candidates.shape[0])
    _, idx = jax.lax.top_k(candidate_reward, top)
    paths = candidates[idx]
    scores, reward = score_paths(cfg, layout, scorer, data, problem, paths, None)
    i = jnp.argmax(reward)
    better = reward[i] > best.reward
    new = BestPaths(paths[i], scores[i], reward[i], tchebycheff(scores[i], problem.preference, problem.ideal))
    return jax.tree.map(lambda n, o: jnp.where(better, n, o), new, best)
