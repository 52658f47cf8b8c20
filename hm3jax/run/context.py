"""The run context: what every stage reads (the validated config, the models, the batches, the
preferences, the mesh, the stage store and the metrics sink), how it is loaded, and the keys and
methods each preference's upper-level merge is derived with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from hm3jax.config import RunConfig, RunConfigError, preference_matrix, task_names
from hm3jax.io import load_pretrained, load_tokenizer
from hm3jax.io.hf import has_safetensors
from hm3jax.io.sharded import load_sharded
from hm3jax.models.config import ModelConfig
from hm3jax.objectives.batch import Batch, make_suite_batch, special_ids
from hm3jax.objectives.synthetic import tasks as embedded_suite
from hm3jax.objectives.taskfiles import FileTask, graded_prompts
from hm3jax.run.store import StageStore, metrics_logger
from hm3jax.search.upper import UPPER_METHODS, dare_key
from hm3jax.settings import BASE
from hm3jax.sharding import ShardingError, make_mesh, param_shardings
from hm3jax.zoo import CONFIGS, ZooError, build_zoo, check_zoo_dir, load_zoo


class Context(NamedTuple):
    """What every stage reads: the validated config, the models, the batches and the sinks."""

    cfg: RunConfig
    model_cfg: ModelConfig
    tasks: tuple[str, ...]
    base: dict
    experts: list[dict]
    tokenizer: Any
    search: Batch
    heldout: Batch
    prefs: np.ndarray
    store: StageStore
    log: Callable[[dict], None]
    cache: dict  # compiled trainers and scorers shared by the stages (same shapes, one compilation)
    mesh: Any = None  # the device mesh of the searches (None: one device)
    suite: tuple = ()  # the tasks (tasks.kind files: objectives.taskfiles.FileTask, with their records)


def load_context(cfg: RunConfig) -> Context:
    """The stages' Context of a validated config: models, tokenizer, batches, preferences, the stage
    store and the metrics log (the zoo is built first when missing)."""
    tasks = task_names(cfg)
    if cfg.models.zoo is not None:
        zc = CONFIGS[cfg.models.zoo.config]
        try:
            build_zoo(cfg.models.zoo.dir, zc, seed=cfg.models.zoo.seed, progress=cfg.log.progress)
            model_cfg, models, tokenizer = load_zoo(cfg.models.zoo.dir)
        except ZooError as e:
            raise RunConfigError(zoo_problem(cfg, e)) from None
        suite = zc.suite()
    else:
        ck = cfg.models.checkpoints
        load = _loader(cfg)
        model_cfg, base = load(ck.base)
        models = {BASE: base}
        for name, path in ck.experts.items():
            c, models[name] = load(path)
            if c.layer_signature != model_cfg.layer_signature or c.num_hidden_layers != model_cfg.num_hidden_layers:
                raise RunConfigError(f"models.checkpoints.experts.{name}: {path} has another layer layout "
                                     "or depth than the base")
        tokenizer = load_tokenizer(ck.base)
        suite = embedded_suite()
    if cfg.tasks.kind == "files":
        suite = tuple(FileTask(t, cfg.tasks.files[t].search, cfg.tasks.files[t].heldout, cfg.tasks.files[t].scorer)
                      for t in tasks)
    check_models(tasks, models)
    search, heldout = load_batches(suite, tokenizer)
    if cfg.tasks.kind == "files":
        _check_lengths(cfg, model_cfg, suite, tokenizer, max(search.tokens.shape[1], heldout.tokens.shape[1]))
    mesh = search_mesh(cfg)
    if mesh is not None:  # every model FSDP-sharded (if not loaded so): the merges and scorers follow
        models = {k: jax.device_put(v, param_shardings(v, mesh, cfg.mesh)) for k, v in models.items()}
    return Context(cfg, model_cfg, tasks, models[BASE], [models[t] for t in tasks], tokenizer,
                   search, heldout, preference_matrix(cfg), StageStore(cfg.output_dir),
                   metrics_logger(cfg.output_dir, cfg.log.tensorboard), {}, mesh, tuple(suite))


def zoo_problem(cfg: RunConfig, e: Exception) -> str:
    """The error for a models.zoo.dir that cannot be used, with the command that rebuilds it."""
    z = cfg.models.zoo
    return (f"models.zoo.dir: {e}. To rebuild it for this run: python -m hm3jax.zoo {z.dir} --config "
            f"{z.config} --seed {z.seed} --force")


def check_zoo(cfg: RunConfig) -> None:
    """Before any run directory is made: the zoo directory must be missing, empty, or a complete zoo
    of the run's zoo config and seed (what build_zoo reuses). Raises RunConfigError otherwise."""
    if cfg.models.zoo is None:
        return
    try:
        check_zoo_dir(cfg.models.zoo.dir, CONFIGS[cfg.models.zoo.config], cfg.models.zoo.seed)
    except ZooError as e:
        raise RunConfigError(zoo_problem(cfg, e)) from None


def _check_lengths(cfg: RunConfig, model_cfg, suite, tokenizer, scored_len: int) -> None:
    """Task files whose rows the model cannot hold are a config error before any search: the longest
    prompt + answer, and the longest graded prompt + tasks.max_new_tokens."""
    limit = model_cfg.max_position_embeddings
    if scored_len > limit:
        raise RunConfigError(f"tasks.files: the longest prompt + answer takes {scored_len} tokens (padded), "
                             f"more than the model's max_position_embeddings {limit}")
    rows, pad = cfg.tasks.generate_rows, special_ids(tokenizer)[1]
    for task in suite if rows else ():
        need = graded_prompts(task, tokenizer, rows, pad)[1].shape[1] + cfg.tasks.max_new_tokens
        if need > limit:
            raise RunConfigError(f"tasks.max_new_tokens {cfg.tasks.max_new_tokens}: the longest graded prompt of "
                                 f"tasks.files.{task.name}.heldout plus the answer takes {need} positions, "
                                 f"more than the model's max_position_embeddings {limit}")


def run_mesh(cfg: RunConfig):
    """The run's device mesh (jax.distributed.initialize() first when `mesh.distributed`), built
    before any work so a mesh that does not fit the devices is reported as a config error."""
    try:
        return make_mesh(cfg.mesh)
    except ShardingError as e:
        raise RunConfigError(str(e)) from None


def search_mesh(cfg: RunConfig):
    """The mesh the searches run on: None on one device (the default: nothing is moved)."""
    mesh = run_mesh(cfg)
    return mesh if mesh.devices.size > 1 else None


def _loader(cfg: RunConfig) -> Callable[[str], tuple[ModelConfig, Any]]:
    """path -> (ModelConfig, params): on a mesh of several devices, safetensors checkpoints are read
    straight into shards (io.sharded.load_sharded: each device reads its slice); else load_pretrained."""
    mesh = search_mesh(cfg)

    def load(path: str):
        if mesh is not None and os.path.isdir(path) and has_safetensors(path):
            return load_sharded(path, mesh, dtype=cfg.models.dtype, mesh_cfg=cfg.mesh)
        return load_pretrained(path, dtype=cfg.models.dtype)

    return load


def check_models(tasks: Sequence[str], models: dict) -> None:
    missing = [n for n in [BASE, *tasks] if n not in models]
    if missing:
        raise RunConfigError(f"models: no checkpoint for {', '.join(missing)}")


def load_batches(suite, tokenizer) -> tuple[Batch, Batch]:
    return make_suite_batch(suite, "search", tokenizer), make_suite_batch(suite, "heldout", tokenizer)


def upper_key(ctx: Context) -> jax.Array:
    """The key of the upper level (run_upper_many splits it into one key per preference)."""
    return jax.random.fold_in(jax.random.key(ctx.cfg.seed), 1)


def merge_keys(ctx: Context) -> list[jax.Array]:
    """The DARE key each preference's upper-level merge used (as run_upper_many derives them)."""
    return [dare_key(k) for k in jax.random.split(upper_key(ctx), len(ctx.prefs))]


def upper_methods(ctx: Context, upper_out: dict | None) -> list[str]:
    """The merge method of each preference's upper level (the pick of upper.method "auto")."""
    if upper_out is not None and "method" in upper_out:
        return [UPPER_METHODS[int(i)] for i in np.asarray(upper_out["method"]).reshape(-1)]
    return [ctx.cfg.upper.method] * len(ctx.prefs)
