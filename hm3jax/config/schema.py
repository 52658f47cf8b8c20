"""The schema of a run config: RunConfig and its sections as nested frozen dataclasses, each field's
documentation right under it (draccus reads it for `--help`), the config's enumerations and
RunConfig's error. No draccus, no JAX: the upper and lower levels' sections and the mesh come from
hm3jax.settings."""

from __future__ import annotations

import dataclasses

from hm3jax.settings import LowerConfig, MeshConfig, UpperConfig

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
    upper: UpperConfig = dataclasses.field(default_factory=UpperConfig)
    """Upper level: parameter-space merge per preference (hm3jax.search.upper.UpperConfig)."""
    lower: LowerConfig = dataclasses.field(default_factory=LowerConfig)
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
