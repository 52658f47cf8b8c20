"""The filesystem checks of a run config: what `validate` reads on disk before any work. The
checkpoint directories exist and share one layer layout (only their config.json files are read),
the task files exist and every record of them parses, and the output directory is safe to write
(no input inside it). Each raises RunConfigError naming the key at fault. Reads, never writes.
JAX-free at import: the readers load inside the functions that use them."""

from __future__ import annotations

import os

from hm3jax.config.schema import CheckpointSource, RunConfig, RunConfigError, TaskFiles

_SIGNATURE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "qkv_bias", "mlp_bias")


def checkpoint_config(path: str, key: str):
    """The ModelConfig of the checkpoint directory `path` (its config.json only), for config key
    `key`; RunConfigError when it is no directory, has no config.json or an unreadable one."""
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


def check_checkpoints(ck: CheckpointSource) -> None:
    """models.checkpoints: a base and experts given, each a checkpoint directory, all of the base's
    layer layout."""
    if not ck.base:
        raise RunConfigError("models.checkpoints.base: no base checkpoint directory given")
    if not ck.experts:
        raise RunConfigError("models.checkpoints.experts: no experts given (task name -> directory)")
    base = checkpoint_config(ck.base, "models.checkpoints.base")
    for name, path in ck.experts.items():
        key = f"models.checkpoints.experts.{name}"
        c = checkpoint_config(path, key)
        if c.layer_signature != base.layer_signature:
            diff = ", ".join(f"{f} {a} vs {b}" for f, a, b in zip(_SIGNATURE, c.layer_signature,
                                                                 base.layer_signature) if a != b)
            raise RunConfigError(f"{key}: {os.path.join(path, 'config.json')} has another width than the "
                                 f"base {os.path.join(ck.base, 'config.json')} ({diff}); the layers of "
                                 "all models must share one layout")


def check_task_paths(name: str, f: TaskFiles) -> None:
    """tasks.files.<name>: its search and held-out JSONL files given and existing."""
    for split in ("search", "heldout"):
        path = getattr(f, split)
        if not path:
            raise RunConfigError(f"tasks.files.{name}.{split}: no JSONL file given")
        if not os.path.exists(path):
            raise RunConfigError(f"tasks.files.{name}.{split}: {path}: no such file")


def read_task_files(files: dict[str, TaskFiles]) -> None:
    """Every record of every task file read and checked (hm3jax.objectives.taskfiles.FileTask)."""
    # loads JAX: imported where needed, so a config is parsed and refused before JAX loads
    from hm3jax.objectives.taskfiles import FileTask, TaskFileError

    for name, f in files.items():  # every record is read and checked before any work
        try:
            FileTask(name, f.search, f.heldout, f.scorer)
        except TaskFileError as e:
            raise RunConfigError(str(e)) from None


def check_output_dir(cfg: RunConfig) -> None:
    """output_dir is safe to write: it neither is, contains, nor lies inside an input of the run
    (checkpoint directories, task files; hm3jax.io.atomic.check_output_path)."""
    m = cfg.models
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
