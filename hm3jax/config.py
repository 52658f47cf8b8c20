"""RunConfig: every setting of `python -m hm3jax.train`, as nested frozen dataclasses.

Parsed by draccus (the config library of levanter) from a YAML file plus dotted command-line
overrides (`--config_path configs/smoke.yaml --upper.density 0.5`); `--help` lists every field with
its documentation. Config flows one way: YAML + CLI -> RunConfig -> `validate` (before any work) ->
the stages. The resolved config is written to `<output_dir>/config.yaml`; a later run with the same
output directory resumes only when its resolved config is the same (see rundir.py).

    cfg = validate(parse_run_config(["--config_path", "configs/smoke.yaml"]))
    resumed = rundir.prepare_run_dir(cfg)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import draccus
import draccus.argparsing
import numpy as np

# the sections come from hm3jax.settings, which imports no JAX: a config is parsed and checked first
from hm3jax.confighelp import suggest_key, tidy_help
from hm3jax.settings import (
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    OBJECTIVES,
    SCORERS,
    LowerConfig,
    MeshConfig,
    ShardingError,
    UpperConfig,
)

CONFIG_FILE = "config.yaml"
ZOO_CONFIGS = ("default", "small")
TASK_KINDS = ("embedded", "files")
PREFERENCE_KINDS = ("dirichlet", "grid")
SIMPLEX_TOL = 1e-6


class RunConfigError(ValueError):
    """A run config that cannot be used; the message names the config key (and file) at fault."""


# ------------------------------------------------------------------------------------ the config
@dataclasses.dataclass(frozen=True)
class ZooSource:
    """The embedded model zoo (a base and one expert per embedded task), built on CPU if missing."""

    dir: str = "zoo/default"
    """Directory of the zoo (relative paths: to the working directory): built there when missing,
    reused when its zoo.json matches config and seed."""
    config: str = "default"
    """Zoo hyperparameter set: default (6 layers, width 64) or small (3 layers, width 32; for tests)."""
    seed: int = 0
    """Seed of the zoo build (init and batch sampling), in [0, 2**32)."""


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Local Hugging Face checkpoints: a base and one fine-tuned expert per task, all of one width."""

    base: str = ""
    """Directory of the base model (config.json + safetensors)."""
    experts: dict[str, str] = dataclasses.field(default_factory=dict)
    """Task name -> expert checkpoint directory; the task order of the run is this mapping's order."""


@dataclasses.dataclass(frozen=True)
class ModelsConfig:
    """Where the base and experts come from: exactly one of `zoo` and `checkpoints` (neither = the
    default embedded zoo)."""

    zoo: ZooSource | None = None
    """Use (and build if missing) the embedded zoo."""
    checkpoints: CheckpointSource | None = None
    """Use local checkpoints."""
    dtype: str = "float32"
    """dtype the params are loaded and merged in: float32, bfloat16 or float16."""


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """A real task's data: JSONL files with one {"prompt", "answer"} object per line, plus "test" for
    pass_at_k ("answer": the reference continuation: the GSM8K solution ending in "#### <number>",
    the reference translation, or a reference program; "test": code run against a generated
    program). See hm3jax.objectives.taskfiles."""

    search: str = ""
    """JSONL file of the search split (scored while searching)."""
    heldout: str = ""
    """JSONL file of the held-out split (the front and the report)."""
    scorer: str = "gsm8k"
    """Scorer of generated held-out answers: gsm8k (answer match), chrf (chrF / 100) or pass_at_k (pass@1)."""


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """What the merged models are scored on: one task per expert."""

    kind: str = "embedded"
    """embedded (the synthetic math / code / translation suite) or files (real tasks, `files`)."""
    files: dict[str, TaskFiles] = dataclasses.field(default_factory=dict)
    """Task name -> its data files and scorer (kind=files); the names are the experts' task names."""
    objective: str = "exact_match"
    """Score of every search and of the held-out table: exact_match (the reference answer
    teacher-forced, all tokens right, in [0, 1]) or loglik (its mean log-likelihood)."""
    max_new_tokens: int = 256
    """Most tokens generated per answer by the real-task scorers (kind=files), an integer >= 1."""
    generate_rows: int = 64
    """kind=files: held-out prompts per task whose generated answers the task's scorer grades, for
    the base, the experts and HM3's solutions (the first rows of each held-out file); 0: none."""


@dataclasses.dataclass(frozen=True)
class PreferencesConfig:
    """The preference vectors λ (one per front point searched)."""

    n: int = 6
    """Number of generated preferences, >= 0 (0: only the `extra` ones)."""
    kind: str = "dirichlet"
    """dirichlet (uniform draws on the simplex, seeded by the run seed) or grid (Das-Dennis, >= n points)."""
    extra: tuple[tuple[float, ...], ...] = ()
    """Explicit preferences added to the generated ones: one weight per task, >= 0, summing to 1."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation and the baselines of the report."""

    batch_rows: int = 64
    """Examples scored per batch, >= 1 (bounds the memory of held-out scoring)."""
    baselines: bool = True
    """Also run the report's baselines (TA, TIES, DARE-TIES, random and evolutionary path search)."""
    path_search_budget: int | None = None
    """Scored paths per preference for the random and evolutionary path searches, >= 1 (None:
    HM3's count, so the baselines search at the same budget)."""


@dataclasses.dataclass(frozen=True)
class FrontConfig:
    """The Pareto front."""

    cost_objective: bool = False
    """Add the inference cost (FLOPs per token, lower is better) as one more objective of the front."""
    cost_seq_len: int = 64
    """Sequence length at which FLOPs per token are counted (hm3jax.cost), >= 1."""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Logging (never part of the run comparison: a run may be resumed with other log settings)."""

    tensorboard: bool = True
    """Write TensorBoard event files to <output_dir>/tensorboard (steps: PPO iterations) when
    tensorboardX is installed; without it, one warning and metrics.jsonl only."""
    progress: bool = True
    """Progress bars on long stages."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole `python -m hm3jax.train` run."""

    output_dir: str = "runs/default"
    """Run directory (config.yaml, front.json, front.png, report.md, metrics.jsonl, checkpoints/)."""
    seed: int = 0
    """Seed of the preferences, DARE masks and searches, in [0, 2**32)."""
    models: ModelsConfig = dataclasses.field(default_factory=ModelsConfig)
    """The base model and the experts."""
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    """The tasks (one per expert)."""
    preferences: PreferencesConfig = dataclasses.field(default_factory=PreferencesConfig)
    """The preference vectors."""
    upper: UpperConfig = dataclasses.field(default_factory=lambda: DEFAULT_UPPER)
    """Upper level: parameter-space merge per preference (hm3jax.search.upper.UpperConfig)."""
    lower: LowerConfig = dataclasses.field(default_factory=lambda: DEFAULT_LOWER)
    """Lower level: the layer-path search (hm3jax.search.lower.LowerConfig: env, agent, ppo); the
    random and evolutionary path searches of the report run at the same budget of scored paths."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Held-out evaluation and baselines."""
    front: FrontConfig = dataclasses.field(default_factory=FrontConfig)
    """The Pareto front."""
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    """Logging."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """Devices: the (data, fsdp) mesh, partition-rule overrides, multi-host start (hm3jax.sharding;
    default one device). Not compared on resume: a run may continue on another slice."""


# ------------------------------------------------------------------------------------ parsing
def _draccus_message(e: BaseException) -> str:
    """The message of a parse error: a section's own check (e.g. UpperConfig's, chained by draccus
    under "Couldn't instantiate class ...") alone; else draccus's message with its causes."""
    parts = [str(e)]
    cause = e.__cause__
    while cause is not None:
        parts.append(str(cause))
        cause = cause.__cause__
    if len(parts) > 1 and parts[0].startswith("Couldn't instantiate class") and parts[-1]:
        return parts[-1]
    return ": ".join(p for p in parts if p)


def run_config_parser(config_path: str | os.PathLike | None = None,
                      prog: str = "python -m hm3jax.train") -> draccus.argparsing.ArgumentParser:
    """draccus's parser of RunConfig (reading `config_path` when the arguments give no --config_path),
    its help tidied by confighelp.tidy_help with a run's defaults (DEFAULT_UPPER, DEFAULT_LOWER)."""
    parser = draccus.argparsing.ArgumentParser(config_class=RunConfig, config_path=config_path, exit_on_error=False,
                                               prog=prog)
    tidy_help(parser.parser, RunConfig())
    return parser


def help_text(prog: str = "python -m hm3jax.train") -> str:
    """The text `python -m hm3jax.train --help` prints: every dotted key, its doc string and its default."""
    return run_config_parser(prog=prog).parser.format_help()


def parse_run_config(args: Sequence[str] | None = None, config_path: str | os.PathLike | None = None,
                     prog: str = "python -m hm3jax.train") -> RunConfig:
    """Parse `args` (`--config_path FILE`, dotted overrides; default sys.argv[1:]) into a RunConfig.

    `config_path` is the file read when `args` give none. Raises RunConfigError naming the unknown
    or malformed key (and the file); `--help` prints the documented fields and exits.
    """
    args = list(args) if args is not None else None
    where = config_path
    if args is not None and "--config_path" in args:
        i = args.index("--config_path")
        where = args[i + 1] if i + 1 < len(args) else None
    if where is not None and not os.path.isfile(where):
        raise RunConfigError(f"--config_path {where}: no such file")
    try:
        return run_config_parser(config_path, prog).parse_args(args)
    except (draccus.utils.DraccusException, draccus.utils.ParsingError, ValueError, TypeError) as e:
        src = f"{where}: " if where else ""
        raise RunConfigError(f"{src}{suggest_key(_draccus_message(e), RunConfig)}") from None


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The RunConfig of a YAML file (e.g. a run directory's config.yaml), no overrides."""
    return parse_run_config([], config_path=os.fspath(path))


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML, fields in declaration order (what config.yaml holds)."""
    return draccus.dump(cfg, sort_keys=False)


# ------------------------------------------------------------------------------------ validation
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


def _width(path: str, key: str):
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.io import CheckpointError
    from hm3jax.io.hf import read_config
    from hm3jax.models.config import ConfigError

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise RunConfigError(f"{key}: {path} is not a checkpoint directory (no such directory)")
    if not os.path.exists(cfg_file):
        raise RunConfigError(f"{key}: {path} has no config.json (expected an HF checkpoint directory)")
    try:
        return read_config(cfg_file)  # refuses a FIFO or device named config.json before opening it
    except (ConfigError, CheckpointError) as e:
        raise RunConfigError(f"{key}: {e}") from None


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


_SIGNATURE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "qkv_bias", "mlp_bias")


def _check_checkpoints(ck: CheckpointSource) -> None:
    if not ck.base:
        raise RunConfigError("models.checkpoints.base: no base checkpoint directory given")
    if not ck.experts:
        raise RunConfigError("models.checkpoints.experts: no experts given (task name -> directory)")
    base = _width(ck.base, "models.checkpoints.base")
    for name, path in ck.experts.items():
        key = f"models.checkpoints.experts.{name}"
        c = _width(path, key)
        if c.layer_signature != base.layer_signature:
            diff = ", ".join(f"{f} {a} vs {b}" for f, a, b in zip(_SIGNATURE, c.layer_signature,
                                                                 base.layer_signature) if a != b)
            raise RunConfigError(f"{key}: {os.path.join(path, 'config.json')} has another width than the "
                                 f"base {os.path.join(ck.base, 'config.json')} ({diff}); the layers of "
                                 "all models must share one layout")


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
        for split in ("search", "heldout"):
            path = getattr(f, split)
            if not path:
                raise RunConfigError(f"tasks.files.{name}.{split}: no JSONL file given")
            if not os.path.exists(path):
                raise RunConfigError(f"tasks.files.{name}.{split}: {path}: no such file")
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.objectives.taskfiles import FileTask, TaskFileError

    for name, f in t.files.items():  # every record is read and checked before any work
        try:
            FileTask(name, f.search, f.heldout, f.scorer)
        except TaskFileError as e:
            raise RunConfigError(str(e)) from None


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
        _check_checkpoints(m.checkpoints)
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
    inputs = []
    if m.checkpoints is not None:
        inputs += [m.checkpoints.base, *m.checkpoints.experts.values()]
    inputs += [p for f in cfg.tasks.files.values() for p in (f.search, f.heldout)]
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.io.atomic import UnsafeOutputError, check_output_path

    try:
        check_output_path(cfg.output_dir, inputs, what="output_dir")
    except UnsafeOutputError as e:
        raise RunConfigError(str(e)) from None
    return cfg
