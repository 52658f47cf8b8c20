"""Lower level of HM3 on real models: the global layer pool, the model scorer and the chunk loop.

    data, problems, layout = build_search(model_cfg, experts, merged, search_batch, preferences, ideal)
    scorer = make_model_scorer(model_cfg, num_tasks, cfg)
    trainer = make_lower_train(cfg, layout, scorer)
    result = run_lower(trainer, layout, problems, data, key, num_chunks, checkpoint_dir=..., progress=True,
                       hooks=[...])

The pool holds the K experts' layers once and each preference's merged layers as its own block
(env.to_global maps a preference's local actions into it); a path is scored with the shell
(embeddings, final norm, head) of that preference's merged model. Only the "search" split reaches
the scorer: rollouts see a random stratified minibatch of it, best paths the whole of it.
`run_lower` is the only Python loop: one jitted chunk of a searcher (search.base.Searcher) per
step, then its hooks (levanter's, in search.hooks and re-exported here): `checkpoint_hook` (orbax,
resumable), `log_hook`, `progress_hook` (tqdm), or any callable of a ChunkInfo.
`restore_lower_state` reads a search's latest chunk checkpoint back without running anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.models import forward_path
from hm3jax.models.params import iter_leaves
from hm3jax.models.pool import LayerPool, build_pool, shell_of
from hm3jax.moo import tchebycheff
from hm3jax.objectives.batch import Batch, pad_rows
from hm3jax.objectives.scoring import answer_loglik, answer_prob, exact_match, make_params_scorer, task_means
from hm3jax.search import env as en
from hm3jax.search.base import ChunkMetrics, Searcher, Trainer
from hm3jax.search.env import (
    BestPaths,
    EnvConfig,
    PathLayout,
    PathProblem,
    Scorer,
)
from hm3jax.search.hooks import (  # noqa: F401  (re-exported: their home is search.hooks)
    ChunkCheckpointer,
    ChunkInfo,
    Hook,
    ProgressBar,
    checkpoint_hook,
    log_hook,
    progress_hook,
)
from hm3jax.search.ppo import make_train
from hm3jax.search.sharded import place_search
from hm3jax.settings import OBJECTIVES, LowerConfig  # noqa: F401

_log = logging.getLogger(__name__)


class SearchData(NamedTuple):
    """Arrays the model scorer reads (a jit argument of every chunk).

    layers: the global pool's stacked layers [K·L + N·L, ...]; shells: each preference's merged
    shell, stacked [N, ...]; batch: the search split (padded to a multiple of score_chunk);
    task_rows: int32 [K, n] row indices of each task in `batch` (n = the smallest task's count);
    align: the switch maps every scored path runs with (models.align.Alignment), or None.
    """

    layers: Any
    shells: Any
    batch: Batch
    task_rows: jax.Array
    align: Any = None


def layer_summary(layers: dict, base_layers: dict | None = None) -> np.ndarray:
    """[P, S] fixed per-layer statistics of stacked `layers` [P, ...], standardised over the pool.

    Per weight tensor: log Frobenius norm; with `base_layers` [L, ...] (pool entry p is compared
    with base layer p % L), also the relative distance ||w - w_base|| / ||w_base|| of the task vector.
    """
    cols = []
    base = dict(iter_leaves(base_layers)) if base_layers is not None else None
    for path, a in sorted(iter_leaves(layers)):
        a = np.asarray(a, np.float32).reshape(a.shape[0], -1)
        norm = np.linalg.norm(a, axis=1)
        cols.append(np.log(norm + 1e-8))
        if base is not None:
            b = np.asarray(base[path], np.float32).reshape(base[path].shape[0], -1)
            b = b[np.arange(a.shape[0]) % b.shape[0]]
            cols.append(np.linalg.norm(a - b, axis=1) / (np.linalg.norm(b, axis=1) + 1e-8))
    s = np.stack(cols, axis=1)
    sd = s.std(0)
    return ((s - s.mean(0)) / np.where(sd > 1e-6, sd, 1.0)).astype(np.float32)


def build_search(model_cfg, experts: Sequence[dict], merged: Sequence[dict], batch: Batch,
                 preferences, ideal, cfg: LowerConfig = LowerConfig(), base: dict | None = None):
    """(SearchData, PathProblem [N], PathLayout) for N preferences.

    Args:
      model_cfg: the shared ModelConfig; experts: K params pytrees; merged: N params pytrees, the
        upper level's merge for each preference (in preference order).
      batch: the *search* split (e.g. make_suite_batch(tasks, "search", tokenizer)).
      preferences: [N, K]; ideal: [K] (or [N, K]) ideal point z* for the Tchebycheff reward.
      base: optional base params; adds task-vector distances to the layer summaries.
    """
    K, N = len(experts), len(merged)
    prefs = np.asarray(preferences, np.float32)
    if prefs.shape != (N, K):
        raise ValueError(f"preferences must be [N={N}, K={K}] (one per merged model, one weight per "
                         f"expert), got {prefs.shape}")
    pool = build_pool(list(experts) + list(merged), cfgs=[model_cfg] * (K + N))
    L = model_cfg.num_hidden_layers
    layout = PathLayout.make(cfg.env, K, L)
    summ = layer_summary(pool.layers, base["layers"] if base is not None else None)
    local = np.stack([np.concatenate([summ[:K * L], summ[K * L + i * L: K * L + (i + 1) * L]])
                      for i in range(N)])
    search_ideal = None
    if cfg.env.search_score == "answer_prob":
        # z* of the search rows' score: the best expert's answer probability on the search split
        score = jax.jit(make_params_scorer(model_cfg, batch, K, "answer_prob", cfg.score_chunk))
        best = np.stack([np.asarray(score(e)) for e in experts]).max(0)
        search_ideal = jnp.broadcast_to(jnp.asarray(best, jnp.float32), (N, K))
    problems = PathProblem(jnp.asarray(prefs), jnp.broadcast_to(jnp.asarray(ideal, jnp.float32), (N, K)),
                           jnp.arange(N, dtype=jnp.int32), jnp.asarray(local), search_ideal)
    data = with_batch(SearchData(pool.layers, _shells(merged), None, None), batch, K, cfg.score_chunk)
    return data, problems, layout


def _shells(merged: Sequence[dict]):
    """The merged models' non-layer parameters, stacked [N, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[shell_of(m) for m in merged])


def search_data(model_cfg, experts: Sequence[dict], merged: Sequence[dict], batch: Batch, num_tasks: int,
                score_chunk: int) -> SearchData:
    """The SearchData of build_search alone (the pool of the experts' and `merged`'s layers, the
    shells, `batch`'s rows), without the problems' layer summaries or search ideal: what scoring
    known paths on another split (the held-out rows) needs."""
    pool = build_pool(list(experts) + list(merged), cfgs=[model_cfg] * (len(experts) + len(merged)))
    return with_batch(SearchData(pool.layers, _shells(merged), None, None), batch, num_tasks, score_chunk)


def with_batch(data: SearchData, batch: Batch, num_tasks: int, score_chunk: int) -> SearchData:
    """`data` scoring the rows of `batch` instead (e.g. the held-out split over a search's pool):
    the batch padded to a multiple of `score_chunk`, and each task's row indices. The pool, shells
    and alignment maps are kept."""
    task_id = np.asarray(batch.task_id)
    counts = [int((task_id == k).sum()) for k in range(num_tasks)]
    if min(counts) == 0:
        raise ValueError(f"the search batch has no rows for tasks {[k for k in range(num_tasks) if not counts[k]]}")
    n = min(counts)
    task_rows = np.stack([np.flatnonzero(task_id == k)[:n] for k in range(num_tasks)]).astype(np.int32)
    padded = pad_rows(batch, score_chunk)
    return data._replace(batch=Batch(*(jnp.asarray(np.asarray(x)) for x in padded)),
                         task_rows=jnp.asarray(task_rows))


def minibatch_rows(data: SearchData, key: jax.Array, per_task: int) -> Batch:
    """The stratified minibatch of data.batch that `key` draws: `per_task` rows of each task (at
    most the smallest task's count), task by task; with env._ROWS_SEED's key, the search rows."""
    n = data.task_rows.shape[1]
    keys = jax.random.split(key, data.task_rows.shape[0])
    pick = jax.vmap(lambda k, r: r[jax.random.permutation(k, n)[:min(per_task, n)]])(keys, data.task_rows)
    return jax.tree.map(lambda x: x[pick.reshape(-1)], data.batch)


def make_model_scorer(model_cfg, num_tasks: int, cfg: LowerConfig = LowerConfig()) -> Scorer:
    """Scorer over SearchData: per-task means of exact match / answer log-likelihood of paths."""
    objective = answer_loglik if cfg.objective == "loglik" else exact_match  # None: exact_match
    search_rows = answer_prob if cfg.env.search_score == "answer_prob" else objective
    per_task = max(1, cfg.env.search_minibatch // num_tasks)

    def rows_score(data: SearchData, paths, block, rows: Batch, per_example=objective):
        shell = jax.tree.map(lambda x: x[block], data.shells)
        pool = LayerPool(data.layers, (), ())

        def one(path):
            logits = forward_path(model_cfg, shell, pool, path, rows.tokens, rows.attention_mask, data.align)
            return per_example(logits, rows)

        return jax.vmap(one)(paths)  # [B, rows]

    def minibatch(data: SearchData, paths, block, key):
        rows = minibatch_rows(data, key, per_task)
        vals = rows_score(data, paths, block, rows, search_rows)
        return jax.vmap(lambda v: task_means(v, rows, num_tasks))(vals)

    def full(data: SearchData, paths, block):
        c = cfg.score_chunk
        chunks = jax.tree.map(lambda x: x.reshape((-1, c) + x.shape[1:]), data.batch)
        vals = jax.lax.map(lambda rows: rows_score(data, paths, block, rows), chunks)  # [nc, B, c]
        vals = jnp.moveaxis(vals, 0, 1).reshape(paths.shape[0], -1)
        return jax.vmap(lambda v: task_means(v, data.batch, num_tasks))(vals)

    return Scorer(minibatch, full)


def make_lower_train(cfg: LowerConfig, layout: PathLayout, scorer: Scorer) -> Trainer:
    return make_train(cfg.env, cfg.agent, cfg.ppo, layout, scorer)


class LowerResult(NamedTuple):
    """Outcome of run_lower (host arrays).

    best: BestPaths [N] (local paths, whole-search-split scores); global_paths: [N, T] pool indices
    (SKIP = -1); history: ChunkMetrics [iterations run so far (restored ones included), N]; state:
    the final TrainState.
    """

    best: BestPaths
    global_paths: np.ndarray
    history: ChunkMetrics
    state: Any


def run_lower(trainer: Searcher, layout: PathLayout, problems: PathProblem, data, key: jax.Array,
              num_chunks: int, checkpoint_dir: str | os.PathLike | None = None,
              stop_after: int | None = None, progress: bool = False,
              log: Callable[[int, ChunkMetrics], None] | None = None, desc: str = "lower level",
              mesh=None, hooks: Sequence[Hook] = ()) -> LowerResult:
    """Run `num_chunks` jitted chunks of a searcher, calling the hooks after each (resuming from
    the latest checkpoint of a checkpoint hook).

    Args:
      trainer, layout: from make_lower_train / build_search (or ppo.make_train, make_path_search, any
        search.base.Searcher, for other scorers).
      problems, data: PathProblem [N] and the scorer's data (SearchData, or None for a scorer
        without data).
      key: PRNG key of the run (the same key gives the same result, resumed or not).
      checkpoint_dir: shorthand for checkpoint_hook(checkpoint_dir), the first hook: save the state
        with orbax after every chunk; a run restarted with the same directory continues after the
        last saved chunk.
      stop_after: stop after this many chunks in all (to test resuming); None runs all.
      progress: shorthand for progress_hook(desc), the last hook (a tqdm bar labelled `desc`); log:
        shorthand for log_hook(log), after the checkpoint hook (called with (chunk index,
        ChunkMetrics) after each chunk).
      mesh: a device mesh (hm3jax.sharding) to run the chunks on: preferences over `data`, the pool
        over `fsdp` (search.sharded.place_search); None runs where the inputs are.
      hooks: more hooks (see Hook), called after those of the shorthands, in order; at most one of
        all the hooks may have a `restore` method (a checkpoint hook), which decides where to resume.
    """
    if sum(hasattr(h, "restore") for h in hooks) + (checkpoint_dir is not None) > 1:
        raise ValueError("run_lower: more than one hook restores a checkpoint (checkpoint_dir counts as one)")
    state = trainer.init(key, problems)
    # The metrics of every chunk live in the checkpoint beside the state, so a run killed after its
    # last chunk was saved (and before its stage result was) resumes with its whole history.
    history = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), _history_shapes(trainer, state, problems, data,
                                                                               num_chunks))
    hooks = ([checkpoint_hook(checkpoint_dir)] if checkpoint_dir is not None else []) + \
        ([log_hook(log)] if log is not None else []) + list(hooks) + ([progress_hook(desc)] if progress else [])
    resumers = [h for h in hooks if hasattr(h, "restore")]
    start = 0
    if resumers:
        start, state, history = resumers[0].restore(state, history)
    if mesh is not None:
        state, problems, data = place_search(mesh, state, problems, data)
    end = num_chunks if stop_after is None else min(stop_after, num_chunks)
    chunk = trainer.chunk
    if start < end and hasattr(chunk, "lower"):
        # compiled ahead, so the progress bar's first tick and its rate are the search's own time
        t0 = time.perf_counter()
        compiled = chunk.lower(state, problems, data).compile()
        _log.info(f"[{desc}] compiled the search chunk in {time.perf_counter() - t0:.1f}s")
        chunk = compiled
    for h in hooks:
        if hasattr(h, "begin"):
            h.begin(start, num_chunks)
    for c in range(start, end):
        state, metrics = chunk(state, problems, data)
        metrics = jax.tree.map(np.asarray, metrics)
        for buf, m in zip(jax.tree.leaves(history), jax.tree.leaves(metrics)):
            buf[c] = m
        info = ChunkInfo(c, num_chunks, state, metrics, history)
        for h in hooks:
            h(info)
    for h in hooks:
        if hasattr(h, "close"):
            h.close()
    finish = getattr(trainer, "finish", None)
    if finish is not None and end == num_chunks:
        state = finish(state, problems, data)
    best = jax.tree.map(np.asarray, trainer.best(state))
    done = max(start, end)
    hist = jax.tree.map(lambda x: x[:done].reshape((-1,) + x.shape[2:]), history) if done else None
    glob = np.asarray(en.to_global(layout, jnp.asarray(best.path), jnp.asarray(problems.block)[:, None]))
    return LowerResult(best, glob, hist, state)


def restore_lower_state(trainer: Trainer, problems: PathProblem, data, key: jax.Array, num_chunks: int,
                        checkpoint_dir: str | os.PathLike):
    """The trainer state of the latest chunk a search saved in `checkpoint_dir` (what run_lower
    resumes from), restored directly: nothing is initialised, compiled or run (the shapes come from
    jax.eval_shape). `problems` [N] and `num_chunks` must be those of the saved search (their
    shapes, not their values, are read). Raises FileNotFoundError when no chunk was saved."""
    state = jax.eval_shape(trainer.init, key, problems)
    history = _history_shapes(trainer, state, problems, data, num_chunks)
    ckpt = checkpoint_hook(checkpoint_dir)  # the restore run_lower resumes with
    try:
        done, state, _ = ckpt.restore(state, history)
    finally:
        ckpt.close()
    if not done:
        raise FileNotFoundError(f"{checkpoint_dir}: no saved chunk of the search")
    return state


def _history_shapes(trainer: Trainer, state, problems: PathProblem, data, num_chunks: int):
    """ShapeDtypeStructs of the per-chunk metrics of `num_chunks` chunks, [num_chunks, C, N, ...]."""
    shapes = jax.eval_shape(trainer.chunk, state, problems, data)[1]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_chunks,) + x.shape, x.dtype), shapes)


def propose(trainer: Trainer, layout: PathLayout, cfg: EnvConfig, scorer: Scorer, params,
            problem: PathProblem, data, key: jax.Array | None = None) -> BestPaths:
    """Answer a preference with a trained λ-conditioned agent, without training and without any
    search budget: the agent's most likely path for `problem` (a single PathProblem, its merged
    block present in `data`), scored on the whole search split for the record. `key` is unused
    (kept for callers of the sampling version)."""
    problems = jax.tree.map(lambda x: jnp.asarray(x)[None], problem)
    genes = trainer.greedy(params, problems)
    paths = en.decode(layout, genes)
    scores, reward = en.score_paths(cfg, layout, scorer, data, problem, paths, None)
    return BestPaths(paths[0], scores[0], reward[0], tchebycheff(scores[0], problem.preference, problem.ideal))
