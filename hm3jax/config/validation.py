"""Checking a parsed run config and the values derived from it: `validate` (everything that can be
checked before any work: enumerations, counts, ranges, the simplex, the model source, and the
checks on disk of hm3jax.config.files), `check_numbers` (every number finite and in range), and the
run's `task_names` and `preference_matrix`. JAX-free at import: what needs JAX loads inside the
functions that use it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hm3jax.config.files import check_checkpoints, check_output_dir, check_task_paths, read_task_files
from hm3jax.config.schema import (
    PREFERENCE_KINDS,
    SIMPLEX_TOL,
    TASK_KINDS,
    ZOO_CONFIGS,
    PreferencesConfig,
    RunConfig,
    RunConfigError,
    TasksConfig,
    ZooSource,
)
from hm3jax.settings import OBJECTIVES, SCORERS, ShardingError


def task_names(cfg: RunConfig) -> tuple[str, ...]:
    """The run's tasks in order: the embedded suite's, or the checkpoint experts' mapping order."""
    ck = cfg.models.checkpoints
    if ck is not None and ck.experts:
        return tuple(ck.experts)
    if cfg.tasks.kind == "files":
        return tuple(cfg.tasks.files)
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.objectives.synthetic import TASK_NAMES

    return tuple(TASK_NAMES)


def preference_matrix(cfg: RunConfig) -> np.ndarray:
    """[N, K] float32 preferences of a validated config: `preferences.n` generated ones (Dirichlet
    draws seeded by `seed`, or the smallest Das-Dennis grid with >= n points), then `extra`."""
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.moo import das_dennis, dirichlet

    p, k = cfg.preferences, len(task_names(cfg))
    rows = np.zeros((0, k), np.float32)
    if p.n and p.kind == "dirichlet":
        rows = np.asarray(dirichlet(p.n, k, cfg.seed), np.float32)
    elif p.n:
        divisions = 1
        while len(das_dennis(k, divisions)) < p.n:
            divisions += 1
        rows = np.asarray(das_dennis(k, divisions), np.float32)
    extra = np.asarray(p.extra, np.float32).reshape(-1, k)
    return np.concatenate([rows, extra], axis=0)


# Numeric keys with a range beyond "finite" (every float key must be finite, see check_numbers).
_POSITIVE = ("upper.scale", "upper.es_sigma", "lower.ppo.lr", "lower.ppo.critic_lr", "lower.ppo.max_grad_norm",
             "lower.align.learning_rate")
_NON_NEGATIVE = ("lower.ppo.vf_coef", "lower.ppo.ent_coef", "lower.env.length_penalty")
SEED_LIMIT = 2**32  # jax.random.key(s) wraps s modulo 2**32 (x64 off): larger seeds would alias smaller ones
INT_LIMIT = 2**31  # counts, sizes and ids: anything larger is a typo that would allocate or loop forever


def _numbers(x, key: str):
    """(dotted key, value) of every number (bools excluded) in a config value: dataclass fields,
    mapping values and sequence items, walked generically so fields added later are checked too."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _numbers(getattr(x, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{key}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield key, x


def check_numbers(cfg: RunConfig) -> None:
    """Every number of the config is finite and in range: floats finite (and the keys of _POSITIVE /
    _NON_NEGATIVE > 0 / >= 0), seeds (keys named *seed) in [0, 2**32), other integers below 2**31 in
    magnitude. Raises RunConfigError naming the first key at fault."""
    for key, v in _numbers(cfg, ""):
        name = key.rsplit(".", 1)[-1]
        if isinstance(v, float) and not math.isfinite(v):
            raise RunConfigError(f"{key} is {v}; every numeric config value must be a finite number")
        if key in _POSITIVE and not v > 0:
            raise RunConfigError(f"{key} must be > 0, got {v}")
        if key in _NON_NEGATIVE and not v >= 0:
            raise RunConfigError(f"{key} must be >= 0, got {v}")
        if isinstance(v, int) and name.endswith("seed") and not 0 <= v < SEED_LIMIT:
            raise RunConfigError(f"{key} must be an integer in [0, 2**32), got {v}")
        if isinstance(v, int) and not name.endswith("seed") and not -INT_LIMIT <= v < INT_LIMIT:
            raise RunConfigError(f"{key} is {v}; integer config values must lie in [-2**31, 2**31)")


def _check_preferences(p: PreferencesConfig, k: int) -> None:
    if p.kind not in PREFERENCE_KINDS:
        raise RunConfigError(f"preferences.kind {p.kind!r}: expected one of {', '.join(PREFERENCE_KINDS)}")
    if p.n < 0:
        raise RunConfigError(f"preferences.n must be >= 0, got {p.n}")
    if p.n + len(p.extra) < 1:
        raise RunConfigError("preferences: no preferences (n = 0 and no extra ones)")
    for i, lam in enumerate(p.extra):
        key = f"preferences.extra[{i}] = {list(lam)}"
        if len(lam) != k:
            raise RunConfigError(f"{key}: {len(lam)} weights for {k} tasks")
        if any(not math.isfinite(x) or x < 0 for x in lam):
            raise RunConfigError(f"{key} is off the simplex: weights must be finite and >= 0")
        if abs(sum(lam) - 1.0) > SIMPLEX_TOL:
            raise RunConfigError(f"{key} is off the simplex: weights sum to {sum(lam):.6g}, not 1")


def _check_tasks(cfg: RunConfig) -> None:
    t = cfg.tasks
    if t.kind not in TASK_KINDS:
        raise RunConfigError(f"tasks.kind {t.kind!r}: expected one of {', '.join(TASK_KINDS)}")
    if t.objective not in OBJECTIVES:
        raise RunConfigError(f"tasks.objective {t.objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if not isinstance(t.max_new_tokens, int) or t.max_new_tokens < 1:
        raise RunConfigError(f"tasks.max_new_tokens must be an integer >= 1, got {t.max_new_tokens!r}")
    if not isinstance(t.generate_rows, int) or t.generate_rows < 0:
        raise RunConfigError(f"tasks.generate_rows must be an integer >= 0 (0: no generation), "
                             f"got {t.generate_rows!r}")
    ck = cfg.models.checkpoints
    experts = tuple(ck.experts) if ck is not None else task_names(dataclasses.replace(
        cfg, tasks=TasksConfig()))
    where = "models.checkpoints.experts" if ck is not None else f"the {cfg.models.zoo.config} zoo's experts"
    if t.kind == "embedded":
        if t.files:
            raise RunConfigError("tasks.files is set but tasks.kind is embedded; set tasks.kind: files")
        # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
        from hm3jax.objectives.synthetic import TASK_NAMES

        if len(experts) != len(TASK_NAMES) or set(experts) != set(TASK_NAMES):
            raise RunConfigError(f"tasks: the embedded suite has {len(TASK_NAMES)} tasks "
                                 f"({', '.join(TASK_NAMES)}) but {where} are {len(experts)} "
                                 f"({', '.join(experts)}); one expert per task, named after it")
        return
    if len(t.files) != len(experts) or set(t.files) != set(experts):
        raise RunConfigError(f"tasks.files has {len(t.files)} tasks ({', '.join(t.files) or 'none'}) but "
                             f"{where} are {len(experts)} ({', '.join(experts)}); one expert per task, "
                             "named after it")
    for name, f in t.files.items():
        if f.scorer not in SCORERS:
            raise RunConfigError(f"tasks.files.{name}.scorer {f.scorer!r}: expected one of "
                                 f"{', '.join(SCORERS)}")
        check_task_paths(name, f)
    read_task_files(t.files)


def validate(cfg: RunConfig) -> RunConfig:
    """Check everything that can be checked before any work; return the resolved config.

    Resolution: `models` with neither source becomes the default embedded zoo; `lower.objective`
    unset becomes tasks.objective. Checks: one model
    source; zoo config name; checkpoint directories exist and share one layer layout (their
    config.json files only are read); one task per expert, named after it; task files and scorers;
    preferences on the simplex; every number finite and in range; the other enumerations and
    counts. Raises RunConfigError naming
    the key (and the file) at fault. Reads, never writes.
    """
    check_numbers(cfg)
    m = cfg.models
    if m.zoo is not None and m.checkpoints is not None:
        raise RunConfigError("models: give either models.zoo or models.checkpoints, not both")
    if m.zoo is None and m.checkpoints is None:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(m, zoo=ZooSource()))
        m = cfg.models
    if m.zoo is not None and m.zoo.config not in ZOO_CONFIGS:
        raise RunConfigError(f"models.zoo.config {m.zoo.config!r}: expected one of {', '.join(ZOO_CONFIGS)}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise RunConfigError(f"models.dtype {m.dtype!r}: expected float32, bfloat16 or float16")
    if m.checkpoints is not None:
        check_checkpoints(m.checkpoints)
    _check_tasks(cfg)
    _check_preferences(cfg.preferences, len(task_names(cfg)))
    if cfg.lower.objective is None:  # the search scores what the front reports
        cfg = dataclasses.replace(cfg, lower=dataclasses.replace(cfg.lower, objective=cfg.tasks.objective))
    if cfg.lower.objective != cfg.tasks.objective:
        raise RunConfigError(f"lower.objective {cfg.lower.objective!r} differs from tasks.objective "
                             f"{cfg.tasks.objective!r}; the search must score what the front reports")
    if cfg.eval.batch_rows < 1:
        raise RunConfigError(f"eval.batch_rows must be >= 1, got {cfg.eval.batch_rows}")
    if cfg.eval.path_search_budget is not None and cfg.eval.path_search_budget < 1:
        raise RunConfigError(f"eval.path_search_budget must be >= 1 or null, got {cfg.eval.path_search_budget}")
    if cfg.front.cost_seq_len < 1:
        raise RunConfigError(f"front.cost_seq_len must be >= 1, got {cfg.front.cost_seq_len}")
    if not cfg.output_dir:
        raise RunConfigError("output_dir: empty")
    try:
        cfg.mesh.check()
    except ShardingError as e:
        raise RunConfigError(str(e)) from None
    check_output_dir(cfg)
    return cfg
