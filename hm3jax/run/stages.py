"""The stages of a run, each a function of the run's Context and earlier results, each saved in the
stage store as soon as it is done (and the searches after every chunk of iterations), so a run
killed at any point and started again redoes only the unfinished work:

    references (base and experts scored; the ideal point) -> upper level (one merge per preference)
    -> lower level (PPO over layer paths) -> baselines (parameter merges, random / evolutionary path
    search, the architecture-only ablation) -> held-out evaluation -> generated answers (task files)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hm3jax.models import build_pool, generate, generate_path
from hm3jax.models.pool import shell_of
from hm3jax.objectives.batch import Batch, special_ids
from hm3jax.objectives.scoring import make_params_scorer
from hm3jax.objectives.taskfiles import decode_answers, generated_score, graded_prompts
from hm3jax.run.context import Context, merge_keys, upper_key, upper_methods
from hm3jax.run.solutions import describe_path, switches_models
from hm3jax.run.store import CorruptCheckpointError
from hm3jax.search.align import fit_alignment, pool_alignment
from hm3jax.search.lower import build_search, make_lower_train, make_model_scorer, run_lower, search_data
from hm3jax.search.path_baselines import PathSearchConfig, make_path_search
from hm3jax.search.upper import UPPER_METHODS, merge_for_preference, run_upper_many
from hm3jax.settings import MERGE

log = logging.getLogger(__name__)


STAGES = ("references", "upper", "lower", "arch_only", "random_path", "evolutionary_path",
          "param_baselines", "heldout", "generated")


class StopRun(Exception):
    """Raised by a stage when the run was asked to stop there (tests of resuming)."""


def run_stage(ctx: Context, name: str, compute: Callable[[], dict], summary: Callable[[dict], str],
              stop_after: str | None) -> dict:
    """Load stage `name` from its checkpoint or compute and save it; print its one-line summary.

    A checkpoint that is corrupt or incomplete is removed and the stage recomputed (stage results are
    deterministic functions of the config and the models, so nothing is lost), with a warning."""
    start = time.perf_counter()
    try:
        out = ctx.store.load(name)
    except CorruptCheckpointError as e:
        log.warning(f"checkpoint {e.path} is corrupt or incomplete ({e.why}); removed it, recomputing that stage")
        ctx.store.discard(name)
        out = None
    resumed = out is not None
    if out is None:
        log.info(f"[{name}] started")
        out = ctx.store.save(name, compute())
    seconds = time.perf_counter() - start
    line = summary(out)
    log.info(f"[{name}] {line} ({'from checkpoint' if resumed else f'{seconds:.1f}s'})")
    ctx.log({"stage": name, "summary": line, "seconds": seconds, "resumed": resumed})
    if stop_after == name:
        raise StopRun(name)
    return out


def _fmt(scores) -> str:
    return "/".join(f"{x:.3f}" for x in np.asarray(scores).reshape(-1))


def params_scorer(ctx: Context, batch: Batch):
    """params -> [K] per-task scores on `batch` (jittable, vmappable; batch is a jit argument)."""
    return make_params_scorer(ctx.model_cfg, batch, len(ctx.tasks), ctx.cfg.tasks.objective,
                              ctx.cfg.eval.batch_rows)


def model_scorer(ctx: Context):
    """The lower level's path scorer (search.env.Scorer over SearchData), built once per Context so
    every search of the run shares its compiled programs."""
    if "model_scorer" not in ctx.cache:
        ctx.cache["model_scorer"] = make_model_scorer(ctx.model_cfg, len(ctx.tasks), ctx.cfg.lower)
    return ctx.cache["model_scorer"]


def merged_models(ctx: Context, density, scale, methods: Sequence[str] | None = None) -> list[dict]:
    """The upper level's merged params for each preference (recomputed: merges are deterministic)."""
    methods = methods or [ctx.cfg.upper.method] * len(ctx.prefs)
    merge = jax.jit(merge_for_preference, static_argnums=0)
    return [merge(m, ctx.base, ctx.experts, jnp.asarray(p), k, jnp.float32(d), jnp.float32(s))
            for m, p, k, d, s in zip(methods, ctx.prefs, merge_keys(ctx), density, scale)]


def references(ctx: Context, stop_after=None) -> dict:
    def compute():
        models = [ctx.base] + ctx.experts
        out = {}
        for split, batch in (("search", ctx.search), ("heldout", ctx.heldout)):
            score = jax.jit(params_scorer(ctx, batch))
            out[split] = np.stack([np.asarray(score(m)) for m in models])  # [1 + K, K]
        out["ideal"] = out["search"][1:].max(axis=0)
        return out

    return run_stage(ctx, "references", compute, lambda o: f"held-out base {_fmt(o['heldout'][0])}; experts "
                  + ", ".join(f"{t} {_fmt(o['heldout'][1 + i])}" for i, t in enumerate(ctx.tasks)),
                  stop_after)


def upper(ctx: Context, ideal, stop_after=None) -> dict:
    def compute():
        res = run_upper_many(ctx.cfg.upper, ctx.base, ctx.experts, ctx.prefs, ideal,
                             params_scorer(ctx, ctx.search), upper_key(ctx), with_params=False)
        return {"density": res.density, "scale": res.scale, "search": res.scores, "tcheby": res.tcheby,
                "method": np.asarray(res.method, np.int32).reshape(-1)}

    def summary(o):
        picked = ", ".join(upper_methods(ctx, o))
        return (f"{ctx.cfg.upper.method} for {len(ctx.prefs)} preferences ({picked}); mean Tchebycheff "
                f"value {float(np.mean(o['tcheby'])):.4f}")

    return run_stage(ctx, "upper", compute, summary, stop_after)


class SearchSetup(NamedTuple):
    """What a path search runs on, built once (setup_search): the scorer's data (search.lower.
    SearchData, with the switch maps when lower.align is on), the PathProblem of each preference,
    the PathLayout, and the alignment fit (search.align.AlignFit) or None."""

    data: Any
    problems: Any
    layout: Any
    alignment: Any


def setup_search(ctx: Context, merged: list[dict], prefs, ideal, blocks: str) -> SearchSetup:
    """A search over the experts' layers and `merged` (one merged block per preference of `prefs`)
    on the search split. `blocks` names what the merged blocks are (MERGE: the upper level's merges,
    BASE: the base, for the ablation; another name for other pools): searches over the same blocks
    share one alignment fit."""
    data, problems, layout = build_search(ctx.model_cfg, ctx.experts, merged, ctx.search, prefs, ideal,
                                          ctx.cfg.lower, ctx.base)
    fitted = alignment(ctx, merged, blocks)
    if fitted is not None:
        data = data._replace(align=fitted.alignment)
    return SearchSetup(data, problems, layout, fitted)


def _path_search(ctx: Context, name: str, merged: list[dict], blocks: str, ideal, make_trainer, num_chunks: int,
                 key: jax.Array, stop_after=None) -> dict:
    """One search over layer paths (PPO or a baseline), resumable chunk by chunk."""

    def compute():
        data, problems, layout, fitted = setup_search(ctx, merged, ctx.prefs, ideal, blocks)
        scorer = model_scorer(ctx)
        trainer = make_trainer(layout, scorer)
        stop_chunk = None
        if stop_after and stop_after.startswith(f"{name}:"):
            stop_chunk = int(stop_after.split(":")[1])

        def log_chunk(c, m):  # every iteration of the chunk, one value per preference, step = iteration
            fields = ("reward", "best_reward", "length", "entropy", "paths_scored")
            rows = {f: np.asarray(getattr(m, f)).reshape(np.asarray(m.reward).shape[0], -1) for f in fields}
            for j in range(rows["reward"].shape[0]):
                ctx.log({"stage": name, "chunk": c, "iteration": c * len(rows["reward"]) + j + 1,
                         **{f: rows[f][j].tolist() for f in fields}})

        res = run_lower(trainer, layout, problems, data, key, num_chunks,
                        checkpoint_dir=ctx.store.path(name), stop_after=stop_chunk,
                        progress=ctx.cfg.log.progress, log=log_chunk, desc=name, mesh=ctx.mesh)
        if stop_chunk is not None and stop_chunk < num_chunks:
            raise StopRun(stop_after)
        # the history of every chunk, restored ones included (run_lower keeps it in the checkpoint)
        rewards = np.asarray(res.history.reward)
        out = {"path": res.best.path, "global_path": res.global_paths, "search": res.best.scores,
               "tcheby": res.best.tcheby, "reward_curve": rewards.reshape(rewards.shape[0], -1),
               "paths_scored": np.asarray(res.history.paths_scored[-1]).reshape(-1)}
        if fitted is not None:  # held-out scoring runs the paths with the same maps
            out["align"] = fitted.alignment.params
            out["align_gap"] = np.asarray([fitted.gap_before, fitted.gap_after], np.float32)
        return out

    return run_stage(ctx, name, compute, lambda o: f"best paths' mean Tchebycheff value "
                  f"{float(np.mean(o['tcheby'])):.4f} (search split), "
                  f"{int(np.mean(o['paths_scored'])) if 'paths_scored' in o else '?'} distinct paths scored "
                  "per preference", stop_after)


def alignment(ctx: Context, merged: list[dict], blocks: str):
    """The switch maps of searches over `merged` (search.align.AlignFit), or None when
    lower.align is off. Fitted once per Context for each kind of merged blocks (`blocks`: MERGE,
    BASE, ...: the pool's blocks are a function of the run and that name); the same key for every
    search, so searches over one pool run with the same maps."""
    if not ctx.cfg.lower.align.enabled:
        return None
    fits = ctx.cache.setdefault("align", {})
    if blocks not in fits:
        key = jax.random.fold_in(jax.random.key(ctx.cfg.seed), 100)
        fit = fit_alignment(ctx.model_cfg, ctx.cfg.lower.align, ctx.experts, merged, ctx.search, key)
        fits[blocks] = fit
        line = f"switch statistics gap {fit.gap_before:.4f} -> {fit.gap_after:.4f} (search split)"
        log.info(f"[align] {line}")
        ctx.log({"stage": "align", "summary": line, "gap_before": fit.gap_before, "gap_after": fit.gap_after})
    return fits[blocks]


def stage_alignment(ctx: Context, stage: dict, num_blocks: int):
    """The Alignment a finished path search ran with (from its saved maps), or None."""
    if "align" not in stage:
        return None
    K = len(ctx.tasks)
    return pool_alignment(stage["align"], K, ctx.model_cfg.num_hidden_layers, K + num_blocks)


def lower_stage(ctx: Context, name: str, merged: list[dict], ideal, stop_after=None, blocks: str = MERGE) -> dict:
    """The PPO search over the experts' layers and `merged` (`blocks` names them: MERGE, or BASE for
    the architecture-only ablation)."""
    lower = ctx.cfg.lower
    key = jax.random.fold_in(jax.random.key(ctx.cfg.seed), 2 + STAGES.index(name))
    def trainer(layout, scorer):  # the HM3 search and its ablation share one compiled trainer
        if "ppo" not in ctx.cache:
            ctx.cache["ppo"] = make_lower_train(lower, layout, scorer)
        return ctx.cache["ppo"]

    return _path_search(ctx, name, merged, blocks, ideal, trainer, lower.ppo.num_chunks, key, stop_after)


def baseline_search(ctx: Context, name: str, method: str, merged: list[dict], ideal, stop_after=None) -> dict:
    """Random or evolutionary path search at HM3's budget of distinct scored paths (or
    eval.path_search_budget), scoring as many new paths per iteration as PPO and drawing as many
    candidates as PPO rolls out."""
    ppo = ctx.cfg.lower.ppo
    per_it = ppo.paths_per_iteration
    budget = ctx.cfg.eval.path_search_budget or ppo.budget
    iterations = max(ppo.chunk_iterations, budget // per_it // ppo.chunk_iterations * ppo.chunk_iterations)
    pcfg = PathSearchConfig(method=method, population=per_it, candidates=max(ppo.num_envs, per_it),
                            iterations=iterations, chunk_iterations=ppo.chunk_iterations)
    key = jax.random.fold_in(jax.random.key(ctx.cfg.seed), 2 + STAGES.index(name))
    return _path_search(ctx, name, merged, MERGE, ideal,
                        lambda layout, scorer: make_path_search(pcfg, ctx.cfg.lower.env, layout, scorer),
                        pcfg.num_chunks, key, stop_after)


def param_baselines(ctx: Context, stop_after=None) -> dict:
    def compute():
        out = {}
        k = len(ctx.tasks)
        key = jax.random.fold_in(jax.random.key(ctx.cfg.seed), 3)
        both = concat_batches(ctx.search, ctx.heldout)  # one compiled program scores both splits
        score = make_params_scorer(ctx.model_cfg, both, 2 * k, ctx.cfg.tasks.objective, ctx.cfg.eval.batch_rows)
        for method in UPPER_METHODS:
            @jax.jit
            def run(prefs, base, experts, method=method):
                return jax.vmap(lambda lam: score(merge_for_preference(
                    method, base, experts, lam, key, ctx.cfg.upper.density, ctx.cfg.upper.scale)))(prefs)

            s = np.asarray(run(jnp.asarray(ctx.prefs), ctx.base, ctx.experts))
            out[f"{method}/search"], out[f"{method}/heldout"] = s[:, :k], s[:, k:]
        return out

    return run_stage(ctx, "param_baselines", compute, lambda o: ", ".join(
        f"{m} mean held-out {_fmt(np.mean(o[f'{m}/heldout'], axis=0))}" for m in UPPER_METHODS), stop_after)


def concat_batches(a: Batch, b: Batch) -> Batch:
    """Rows of `a` then `b` (padded to one length), b's task ids shifted by a's task count."""
    k = int(np.max(np.asarray(a.task_id))) + 1
    s = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(x):
        x = np.asarray(x)
        return np.pad(x, [(0, 0), (0, s - x.shape[1])]) if x.ndim == 2 else x

    fields = [np.concatenate([pad(x), pad(y)]) for x, y in zip(a, b)]
    fields[3] = np.concatenate([np.asarray(a.task_id), np.asarray(b.task_id) + k]).astype(np.int32)
    return Batch(*fields)


def heldout_scores(ctx: Context, searches: dict[str, tuple[dict, list[dict]]], stop_after=None) -> dict:
    """Held-out scores of every search's best paths: {search name: [N, K]}."""
    def compute():
        out = {}
        full = jax.jit(model_scorer(ctx).full)
        for name, (res, merged) in searches.items():
            data = search_data(ctx.model_cfg, ctx.experts, merged, ctx.heldout, len(ctx.tasks),
                               ctx.cfg.lower.score_chunk)
            data = data._replace(align=stage_alignment(ctx, res, len(merged)))
            rows = [np.asarray(full(data, jnp.asarray(res["global_path"][i])[None], jnp.int32(i)))[0]
                    for i in range(len(ctx.prefs))]
            out[name] = np.stack(rows)
        return out

    return run_stage(ctx, "heldout", compute, lambda o: ", ".join(
        f"{n} mean {_fmt(np.mean(v, axis=0))}" for n, v in o.items()), stop_after)


def generated_scores(ctx: Context, lower: dict, merged: list[dict], stop_after=None) -> dict | None:
    """tasks.kind files: each task's scorer on greedy answers generated for its first
    `tasks.generate_rows` held-out prompts, by the base and the experts ("references" [1 + K, K])
    and HM3's best paths ("hm3" [N, K]; NaN for a path that switches models under alignment maps,
    which generation does not apply). None for the embedded suite or generate_rows 0."""
    t = ctx.cfg.tasks
    if t.kind != "files" or t.generate_rows == 0:
        return None
    eos, pad = special_ids(ctx.tokenizer)
    K, L = len(ctx.tasks), ctx.model_cfg.num_hidden_layers

    bar = None

    def grade(run):  # run(tokens, mask) -> generated tokens; [K] scores
        out = []
        for task in ctx.suite:
            recs, tokens, mask = graded_prompts(task, ctx.tokenizer, t.generate_rows, pad)
            answers = decode_answers(ctx.tokenizer, np.asarray(run(jnp.asarray(tokens), jnp.asarray(mask))), eos)
            out.append(generated_score(task.scorer, answers, recs))
            if bar is not None:
                bar.update(1)
        return out

    def compute():
        nonlocal bar
        if ctx.cfg.log.progress:
            bar = tqdm(total=(1 + K + len(ctx.prefs)) * K, desc="generated", unit="task")
        kw = {"max_new_tokens": t.max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
        refs = [grade(lambda x, m, p=p: generate(ctx.model_cfg, p, x, m, **kw)) for p in [ctx.base] + ctx.experts]
        hm3 = []
        for i in range(len(ctx.prefs)):
            path = describe_path(ctx, lower["path"][i], MERGE)
            if "align" in lower and switches_models(path, MERGE):
                hm3.append([float("nan")] * K)
                if bar is not None:
                    bar.update(K)
                continue
            pool = build_pool(ctx.experts + [merged[i]])
            glob = np.asarray(lower["global_path"][i])
            local = np.where(glob >= K * L, glob - i * L, glob).astype(np.int32)  # block i -> the pool's last
            shell = shell_of(merged[i])
            hm3.append(grade(lambda x, m, shell=shell, pool=pool, local=local:
                             generate_path(ctx.model_cfg, shell, pool, local, x, m, **kw)))
        if bar is not None:
            bar.close()
        return {"references": np.asarray(refs, np.float32), "hm3": np.asarray(hm3, np.float32)}

    def summary(o):
        graded = o["hm3"][~np.isnan(o["hm3"]).any(axis=1)]
        hm3 = f"HM3 mean {_fmt(graded.mean(axis=0))}" if len(graded) else "no HM3 path graded (all aligned)"
        return f"task scorers on generated held-out answers: base {_fmt(o['references'][0])}, {hm3}"

    return run_stage(ctx, "generated", compute, summary, stop_after)


def upper_heldout(ctx: Context, merged: list[dict]) -> np.ndarray:
    """[N, K] held-out scores of the upper level's merges (one forward per preference)."""
    score = jax.jit(params_scorer(ctx, ctx.heldout))
    return np.stack([np.asarray(score(m)) for m in merged])
