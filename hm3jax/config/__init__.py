"""RunConfig: every setting of `python -m hm3jax.train`, as nested frozen dataclasses.

Parsed by draccus (the config library of levanter) from a YAML file plus dotted command-line
overrides (`--config_path configs/smoke.yaml --upper.density 0.5`); `--help` lists every field with
its documentation. Config flows one way: YAML + CLI -> RunConfig -> `validate` (before any work) ->
the stages. The resolved config is written to `<output_dir>/config.yaml`; a later run with the same
output directory resumes only when its resolved config is the same (see rundir.py).

    cfg = validate(parse_run_config(["--config_path", "configs/smoke.yaml"]))
    resumed = rundir.prepare_run_dir(cfg)

This module is the public face of a package of four modules, one job each, imported in this order:
`schema` (the dataclasses, their doc strings and enumerations, RunConfigError), `parsing` (draccus:
parse_run_config, load_run_config, to_yaml, the `--help` text), `files` (the checks on disk:
checkpoint directories, task files, the output directory) and `validation` (validate, check_numbers,
and the derived task_names and preference_matrix). Import the names from here. No JAX at import.
"""

from hm3jax.config.parsing import help_text, load_run_config, parse_run_config, run_config_parser, to_yaml
from hm3jax.config.schema import (
    CONFIG_FILE,
    PREFERENCE_KINDS,
    SIMPLEX_TOL,
    TASK_KINDS,
    ZOO_CONFIGS,
    CheckpointSource,
    EvalConfig,
    FrontConfig,
    LogConfig,
    ModelsConfig,
    PreferencesConfig,
    RunConfig,
    RunConfigError,
    TaskFiles,
    TasksConfig,
    ZooSource,
)
from hm3jax.config.validation import INT_LIMIT, SEED_LIMIT, check_numbers, preference_matrix, task_names, validate

# the sections RunConfig takes from hm3jax.settings, reachable here as before the split
from hm3jax.settings import DEFAULT_LOWER, DEFAULT_UPPER, LowerConfig, MeshConfig, UpperConfig

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_LOWER",
    "DEFAULT_UPPER",
    "INT_LIMIT",
    "PREFERENCE_KINDS",
    "SEED_LIMIT",
    "SIMPLEX_TOL",
    "TASK_KINDS",
    "ZOO_CONFIGS",
    "CheckpointSource",
    "EvalConfig",
    "FrontConfig",
    "LogConfig",
    "LowerConfig",
    "MeshConfig",
    "ModelsConfig",
    "PreferencesConfig",
    "RunConfig",
    "RunConfigError",
    "TaskFiles",
    "TasksConfig",
    "UpperConfig",
    "ZooSource",
    "check_numbers",
    "help_text",
    "load_run_config",
    "parse_run_config",
    "preference_matrix",
    "run_config_parser",
    "task_names",
    "to_yaml",
    "validate",
]
