"""Train, save, reuse and load the embedded zoo: a base and one expert per task, as HF checkpoints.

Layout of a zoo directory (the contract other stages read):
    base/          the shared base, "pretrained" on the mixture of the three tasks
    math/ code/ translation/    one expert per task, a gentle fine-tune of base on that task
    zoo.json       manifest: config, seed, held-out exact match per model per task, the
                   mergeability probe (merges, layer swaps), the targets and whether each was met

Every model directory is written atomically and the manifest last, so a directory with a zoo.json is
complete; a second build with the same config and seed reuses it. A build never touches a directory
it did not write: an existing non-empty directory that is not a zoo of this config and seed is
refused unless `force`, and `force` replaces only the model directories and the manifest, and only
when they hold nothing but files a zoo build writes.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np

from hm3jax.io import load_pretrained, load_tokenizer, save_pretrained
from hm3jax.io.atomic import write_json_atomic
from hm3jax.models.config import ModelConfig
from hm3jax.models.decoder import init_params
from hm3jax.objectives.synthetic import TASK_NAMES
from hm3jax.objectives.tokenizer import build_tokenizer, save_tokenizer
from hm3jax.settings import BASE
from hm3jax.zoo.config import ZooConfig
from hm3jax.zoo.data import base_training_set, expert_training_set
from hm3jax.zoo.probe import score_zoo, targets
from hm3jax.zoo.train import fit

MANIFEST = "zoo.json"
MODEL_NAMES = (BASE,) + TASK_NAMES
_FORMAT = 2
# Below this many expert steps in all, worker start-up costs more than parallel training saves.
_PARALLEL_MIN_STEPS = 2000
# The files a zoo build writes into a model directory (save_pretrained + the char tokenizer).
_MODEL_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
                          r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                          r"|chat_template\.jinja")


class ZooError(RuntimeError):
    """A zoo directory that cannot be used as asked (missing, incomplete, foreign or built differently)."""


# -------------------------------------------------------------------------------------- training
def _keys(seed: int) -> dict[str, jax.Array]:
    k_init, k_base, k_experts = jax.random.split(jax.random.key(seed), 3)
    keys = {"init": k_init, BASE: k_base}
    keys.update({name: jax.random.fold_in(k_experts, k) for k, name in enumerate(TASK_NAMES)})
    return keys


def train_base(zc: ZooConfig, seed: int, progress: bool = True) -> tuple[dict, dict]:
    """Train the base from scratch on the task mixture; return (params, stats)."""
    cfg, keys = zc.model_config(), _keys(seed)
    data = base_training_set(zc, build_tokenizer())
    return fit(cfg, zc.optim_config(), init_params(cfg, keys["init"]), data, keys[BASE],
               steps=zc.base_steps, batch_size=zc.base_batch_size, learning_rate=zc.base_learning_rate,
               warmup_steps=zc.warmup_steps, chunk_steps=zc.chunk_steps, desc=BASE, progress=progress)


def train_expert(zc: ZooConfig, seed: int, task_index: int, base: dict, progress: bool = True,
                 position: int = 0) -> tuple[dict, dict]:
    """Fine-tune `base` on task TASK_NAMES[task_index] (answer + EOS loss); return (params, stats)."""
    name = TASK_NAMES[task_index]
    data = expert_training_set(zc, task_index, build_tokenizer())
    return fit(zc.model_config(), zc.optim_config(), base, data, _keys(seed)[name],
               steps=zc.expert_steps[task_index], batch_size=zc.expert_batch_size,
               learning_rate=zc.expert_learning_rate, warmup_steps=zc.warmup_steps,
               chunk_steps=zc.chunk_steps, desc=name, position=position, progress=progress)


def _expert_job(config: dict, seed: int, task_index: int, base: dict, progress: bool, position: int):
    # Runs in a worker process: plain dicts and numpy arrays cross the process boundary.
    params, stats = train_expert(ZooConfig.from_dict(config), seed, task_index, base, progress, position)
    return jax.tree.map(np.asarray, params), stats


def train_zoo(zc: ZooConfig, seed: int, progress: bool = True,
              workers: int | None = None) -> tuple[ModelConfig, dict[str, dict], dict]:
    """Train the base, then the experts (in worker processes, one per core), in memory.

    Args:
      zc, seed: as in build_zoo.
      progress: show progress bars.
      workers: processes for the expert runs; 0 trains them one after the other in this process
        (sharing its compiled train step); None picks one per CPU core (at most one per task)
        when the runs are long enough to repay each worker's start-up and compilation (about
        10-20 s), else 0. The result does not depend on it.

    Returns:
      (model config, {"base" | task name: params}, {name: stats}) with stats the final training
      loss, wall and CPU seconds of each model.
    """
    base, base_stats = train_base(zc, seed, progress)
    models, stats = {BASE: base}, {BASE: base_stats}
    # Longest run first, so it never waits behind a short one.
    order = sorted(range(len(TASK_NAMES)), key=lambda k: -zc.expert_steps[k])
    if workers is None:
        long_runs = sum(zc.expert_steps) >= _PARALLEL_MIN_STEPS
        workers = min(len(TASK_NAMES), os.cpu_count() or 1) if long_runs else 0
    results = {}
    if workers == 0:
        for k in order:
            results[k] = train_expert(zc, seed, k, base, progress)
    else:
        base_np = jax.tree.map(np.asarray, base)
        # "spawn": a forked child of a process that has started JAX's thread pools can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {k: pool.submit(_expert_job, zc.to_dict(), seed, k, base_np, progress, pos)
                       for pos, k in enumerate(order)}
            results = {k: f.result() for k, f in futures.items()}
    for k, name in enumerate(TASK_NAMES):
        models[name], stats[name] = results[k]
    return zc.model_config(), models, stats


# ------------------------------------------------------------------------------------- disk (edges)
def read_manifest(out_dir: str) -> dict | None:
    """The manifest of `out_dir`, or None when it has none.

    Raises:
      ZooError: the manifest exists but is not a zoo manifest (unreadable, not JSON, not an object,
        no `models` mapping).
    """
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path}: not a readable JSON manifest ({type(e).__name__}: {e}); "
                       "rebuild with force=True / --force") from None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise ZooError(f"{path}: not a zoo manifest (expected a JSON object with a 'models' mapping "
                       "of model name -> subdirectory); rebuild with force=True / --force")
    return manifest


def _is_complete(out_dir: str, manifest: dict) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, sub, "config.json"))
               for sub in manifest["models"].values())


def _foreign_entries(out_dir: str) -> list[str]:
    """Paths in `out_dir` that a forced rebuild would have to replace but no zoo build writes."""
    bad = []
    for name in MODEL_NAMES:
        path = os.path.join(out_dir, name)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            bad.append(path)
            continue
        for entry in sorted(os.listdir(path)):
            full = os.path.join(path, entry)
            if not _MODEL_FILES.fullmatch(entry) or os.path.islink(full) or not os.path.isfile(full):
                bad.append(full)
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.lexists(manifest) and (os.path.islink(manifest) or not os.path.isfile(manifest)):
        bad.append(manifest)
    return bad


def _check_target(out_dir: str, config: ZooConfig, seed: int, force: bool) -> dict | None:
    """Decide what a build may do with `out_dir`: return a reusable manifest, None to build, or raise."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ZooError(f"{out_dir} exists and is not a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    try:
        old = read_manifest(out_dir)
    except ZooError:
        if not force:
            raise  # its message says how to repair it: --force
        old = None
    problem = None
    if old is not None and not force:
        same = (old.get("format") == _FORMAT and old.get("config") == config.to_dict()
                and old.get("seed") == seed)
        if same and _is_complete(out_dir, old):
            return old
        problem = (f"{out_dir} holds a zoo built with another config, seed or format (manifest "
                   f"{os.path.join(out_dir, MANIFEST)})" if not same else
                   f"{out_dir}: {MANIFEST} lists models {list(old['models'])} but some are missing")
    if not force:
        if problem is None:
            problem = (f"{out_dir} is not empty and holds no {MANIFEST}, so it is not a zoo "
                       f"(found: {', '.join(sorted(os.listdir(out_dir))[:8])})")
        raise ZooError(f"{problem}; pass force=True (--force) to rebuild it, or choose another directory")
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise ZooError(f"{out_dir}: --force replaces only what a zoo build writes, and "
                       f"{', '.join(foreign[:5])} {'is' if len(foreign) == 1 else 'are'} not; "
                       "move it away or choose another directory")
    return None


def check_zoo_dir(out_dir: str | os.PathLike, config: ZooConfig | None = None, seed: int = 0) -> dict | None:
    """The manifest `build_zoo(out_dir, config, seed)` would reuse, or None when it would build into
    `out_dir` (missing or empty), without training or writing anything.

    Raises:
      ZooError: it would refuse `out_dir` (not a directory, not a zoo, a zoo of another config, seed
        or format, or an incomplete or corrupt one); the message says why.
    """
    return _check_target(os.fspath(out_dir), config or ZooConfig(), seed, force=False)


def build_zoo(out_dir: str | os.PathLike, config: ZooConfig | None = None, seed: int = 0,
              force: bool = False, progress: bool = True, workers: int | None = None) -> dict:
    """Train, probe and save the zoo into `out_dir`, or reuse the one already there.

    Args:
      out_dir: target directory (created if missing; may exist empty).
      config: hyperparameters (default: `ZooConfig()`); SMALL is the fast test variant.
      seed: seed of parameter init and batch sampling (the task suite has its own, config.task_seed).
      force: rebuild even if `out_dir` holds a zoo (of any config or seed, or a corrupt manifest);
        only the model directories and the manifest are replaced, and only when they hold nothing
        but files a zoo build writes.
      progress: show tqdm progress bars.
      workers: processes for the expert runs (see train_zoo); does not change the result.

    Returns:
      The manifest written to `out_dir/zoo.json`: format, config, seed, tasks, models (name ->
      subdirectory), heldout_exact_match ({model: {task: float}}), probe (see probe_mergeability),
      targets ({target: bool}), targets_met, train (per-model final loss and seconds),
      build_seconds.

    Raises:
      ZooError: `out_dir` is not empty and not a zoo of this config and seed (without `force`), or
        holds files a zoo build does not write where the build would write (with `force`).
    """
    config = ZooConfig() if config is None else config
    out_dir = os.path.abspath(os.fspath(out_dir))
    reuse = _check_target(out_dir, config, seed, force)
    if reuse is not None:
        return reuse

    start = time.perf_counter()
    cfg, models, stats = train_zoo(config, seed, progress=progress, workers=workers)
    tokenizer = build_tokenizer()
    scores, probe = score_zoo(cfg, models, config, tokenizer, jax.random.key(seed))
    met = targets(scores, probe, config)

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.lexists(manifest_path):
        # Drop the manifest before touching any model, so an interrupted rebuild never looks complete.
        os.remove(manifest_path)
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tokenizer(tok_dir)
        for name, params in models.items():
            save_pretrained(os.path.join(out_dir, name), cfg, params, tokenizer_from=tok_dir, overwrite=True)
    manifest = {
        "format": _FORMAT,
        "config": config.to_dict(),
        "seed": seed,
        "tasks": list(TASK_NAMES),
        "models": {name: name for name in models},
        "heldout_exact_match": scores,
        "probe": probe,
        "targets": met,
        "targets_met": all(met.values()),
        "train": stats,
        "build_seconds": time.perf_counter() - start,
        "versions": {"jax": jax.__version__},
    }
    write_json_atomic(manifest_path, manifest)
    return manifest


def load_zoo(out_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, dict], Any]:
    """Load a built zoo.

    Returns:
      (ModelConfig shared by all models, {"base" | task name: params pytree}, the tokenizer as
      transformers loads it from the base directory).

    Raises:
      ZooError: no complete zoo in `out_dir`, or models disagree on the architecture.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ZooError(f"{out_dir}: no {MANIFEST}, so no complete zoo; build one with "
                       f"build_zoo({out_dir!r}) or `python -m hm3jax.zoo {out_dir}`")
    if not _is_complete(out_dir, manifest):
        raise ZooError(f"{out_dir}: {MANIFEST} lists models {list(manifest['models'])} but some "
                       "directories are missing; rebuild with --force")
    if BASE not in manifest["models"]:
        raise ZooError(f"{out_dir}: {MANIFEST} lists no {BASE!r} model")
    cfg, models = None, {}
    for name, sub in manifest["models"].items():
        if os.path.isabs(sub) or os.path.normpath(sub).startswith(os.pardir):
            raise ZooError(f"{out_dir}: {MANIFEST} names model directory {sub!r} outside the zoo")
        c, models[name] = load_pretrained(os.path.join(out_dir, sub))
        if cfg is not None and c != cfg:
            raise ZooError(f"{out_dir}: model {name!r} has config {c} but {BASE!r} has {cfg}")
        cfg = c
    return cfg, models, load_tokenizer(os.path.join(out_dir, manifest["models"][BASE]))

