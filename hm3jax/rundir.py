"""The run directory's config.yaml: a new run writes it, a later run with the same output directory
resumes only when its resolved config is the same (log settings aside)."""

from __future__ import annotations

import json
import os
import tempfile

import draccus

from hm3jax.config import CONFIG_FILE, RunConfig, RunConfigError, load_run_config, to_yaml

# Keys that do not change a run's results: a run directory may be resumed with other values.
_NOT_COMPARED = ("log", "mesh")


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _compared(cfg: RunConfig) -> dict:
    flat = _flat(json.loads(json.dumps(draccus.encode(cfg))))
    return {k: v for k, v in flat.items() if k.split(".")[0] not in _NOT_COMPARED}


def check_run_dir(cfg: RunConfig) -> bool:
    """Whether `cfg.output_dir` holds a run of this same (resolved) config, to be resumed.

    Returns False when the directory is missing or empty (a new run), True when its config.yaml
    equals `cfg` (log settings aside). Raises RunConfigError naming the file and the differing keys
    when it was made by another config, or when it is a non-empty directory without config.yaml.
    """
    out = cfg.output_dir
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise RunConfigError(f"output_dir {out} exists and is not a directory")
    path = os.path.join(out, CONFIG_FILE)
    if not os.path.isfile(path):
        if os.listdir(out):
            raise RunConfigError(f"output_dir {out} is not empty and has no {CONFIG_FILE}: not an hm3jax "
                                 "run directory; choose another output_dir")
        return False
    try:
        old = load_run_config(path)
    except RunConfigError as e:
        raise RunConfigError(f"{path}: cannot be read as a run config ({e}); choose another output_dir") from None
    a, b = _compared(old), _compared(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} now" for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunConfigError(f"{path} was made by a different config: {shown}{more}. Use another "
                             "output_dir, or the same config to resume that run")
    return True


def prepare_run_dir(cfg: RunConfig) -> bool:
    """Create `cfg.output_dir` with its config.yaml (written atomically) unless it holds this run.

    `cfg` must be validated. Returns True when an existing run of the same config is resumed.
    """
    if check_run_dir(cfg):
        return True
    os.makedirs(cfg.output_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cfg.output_dir, prefix=f".{CONFIG_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, os.path.join(cfg.output_dir, CONFIG_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return False


def discard_new_run_dir(cfg: RunConfig, existed: bool) -> None:
    """Undo `prepare_run_dir` for a new run that failed before it wrote anything else: remove its
    config.yaml, and the directory too when this run created it. A directory holding anything more
    (a stage checkpoint, metrics) is left alone, to be resumed."""
    out = cfg.output_dir
    try:
        if sorted(os.listdir(out)) != [CONFIG_FILE]:
            return
        os.remove(os.path.join(out, CONFIG_FILE))
        if not existed:
            os.rmdir(out)
    except OSError:
        pass  # best effort: the run's own error is the one to report
