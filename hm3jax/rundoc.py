"""Documents read back from a run directory or a zoo, checked as untrusted input.

front.json, a zoo's zoo.json and a run's config.yaml may have been edited, truncated, or written by
another version: everything recommend (and export) takes from them is checked here for its type,
range and finiteness, and every model directory a manifest names must lie inside the zoo. Each
problem is a RunDocError naming the file and the field (`front.json: solutions[3].upper.scale:
expected a finite number > 0, got inf`), so a command refuses with one line instead of exporting
garbage or failing with a traceback.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from hm3jax.settings import UPPER_METHODS

SEED_LIMIT = 2**32  # as config.SEED_LIMIT: jax.random.key wraps larger seeds
INDEX_LIMIT = 2**31
JSON_DIGITS = 6  # significant digits of the floats written to a run directory's JSON files


class RunDocError(ValueError):
    """A run-directory or zoo document that cannot be trusted; the message names file and field."""


# ------------------------------------------------------------------------------------ reading
def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON document of `path`, refusing a non-regular file before opening it (a FIFO would
    block), bad UTF-8, bad JSON and nesting too deep to parse, each as one RunDocError."""
    # loaded where used: recommend reads run documents without JAX (hm3jax.io and the search load it)
    from hm3jax.io.paths import NotRegularFileError, open_regular

    path = os.fspath(path)
    try:
        with open_regular(path, "rb", what=what) as f:
            raw = f.read(256 * 2**20 + 1)
    except FileNotFoundError:
        raise RunDocError(f"{path}: no such file") from None
    except NotRegularFileError as e:
        raise RunDocError(str(e)) from None
    except OSError as e:
        raise RunDocError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > 256 * 2**20:
        raise RunDocError(f"{path}: larger than 256 MiB; not a {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunDocError(f"{path}: not UTF-8 (at byte {e.start}); not a {what}") from None
    except json.JSONDecodeError as e:
        raise RunDocError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RunDocError(f"{path}: nested too deeply to be a {what}") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise RunDocError(f"{path}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------ writing
def round_floats(x, digits: int = JSON_DIGITS):
    """A copy of a JSON-ready value (tuples become lists) with every float rounded to `digits`
    significant digits (so a float32 0.7 is stored as 0.7, not 0.699999988079071)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, Mapping):
        return {k: round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [round_floats(v, digits) for v in x]
    return x


# ------------------------------------------------------------------------------------ field checks
def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(v: Any, where: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """`v` as a finite float within [lo, hi] ((lo, hi] with lo_open); RunDocError naming `where`."""
    rng = ""
    if lo is not None or hi is not None:
        rng = f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    want = f"expected a finite number{rng}, got {_show(v)}"
    if not _is_number(v):
        raise RunDocError(f"{where}: {want}")
    try:
        x = float(v)
    except OverflowError:
        raise RunDocError(f"{where}: {want}") from None
    if (not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo))
            or (hi is not None and x > hi)):
        raise RunDocError(f"{where}: {want}")
    return x


def integer(v: Any, where: str, lo: int, hi: int) -> int:
    """`v` as an int in [lo, hi); RunDocError naming `where`."""
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise RunDocError(f"{where}: expected an integer in [{lo}, {hi}), got {_show(v)}")
    return v


def numbers(v: Any, where: str, n: int | None = None, **bounds) -> list[float]:
    """A list of finite numbers (exactly `n` of them when given)."""
    if not isinstance(v, list):
        raise RunDocError(f"{where}: expected a list of numbers, got {_show(v)}")
    if n is not None and len(v) != n:
        raise RunDocError(f"{where}: {len(v)} values for {n} tasks")
    return [number(x, f"{where}[{i}]", **bounds) for i, x in enumerate(v)]


def text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise RunDocError(f"{where}: expected a non-empty string, got {_show(v)}")
    return v


def _mapping(v: Any, where: str) -> Mapping:
    if not isinstance(v, dict):
        raise RunDocError(f"{where}: expected a JSON object, got {_show(v)}")
    return v


# ------------------------------------------------------------------------------------ front.json
def key_data_shape() -> tuple[int, ...]:
    """The shape of the raw data of this JAX's default PRNG key (threefry: (2,))."""
    # loaded where used: recommend reads run documents without JAX (hm3jax.io and the search load it)
    import jax

    return tuple(jax.random.key_data(jax.random.key(0)).shape)


def check_upper(up: Any, where: str) -> dict | None:
    """A solution's "upper" settings: None, or {"method", "density" in (0, 1], "scale" > 0,
    "seed" in [0, 2**32), "key_data" of the default key's shape with uint32 entries}."""
    if up is None:
        return None
    up = _mapping(up, where)
    out = dict(up)
    if "method" in up and up["method"] not in UPPER_METHODS:
        raise RunDocError(f"{where}.method: {_show(up['method'])} is not one of {', '.join(UPPER_METHODS)}")
    if "density" in up:
        out["density"] = number(up["density"], f"{where}.density", lo=0.0, hi=1.0, lo_open=True)
    if "scale" in up:
        out["scale"] = number(up["scale"], f"{where}.scale", lo=0.0, lo_open=True)
    if up.get("seed") is not None:
        out["seed"] = integer(up["seed"], f"{where}.seed", 0, SEED_LIMIT)
    if up.get("key_data") is not None:
        kd = up["key_data"]
        shape = key_data_shape()
        flat = kd if isinstance(kd, list) and all(not isinstance(x, list) for x in kd) else None
        if flat is None or (len(shape) != 1 or len(flat) != shape[0]):
            raise RunDocError(f"{where}.key_data: expected a list of {shape[0] if len(shape) == 1 else shape} "
                              f"unsigned 32-bit integers (a PRNG key's raw data), got {_show(kd)}")
        out["key_data"] = [integer(x, f"{where}.key_data[{i}]", 0, 2**32) for i, x in enumerate(flat)]
    return out


def check_solution(rec: Any, k: int, where: str) -> dict:
    """One solution record of front.json (run.record.Solution.to_json's format), checked: preference and
    held-out scores are K finite numbers (weights >= 0), the path a list of (model, layer) pairs or
    nulls running at least one layer, shell a model name, upper as check_upper. Returns a copy with
    the checked values."""
    rec = _mapping(rec, where)
    out = dict(rec)
    if "preference" not in rec:
        raise RunDocError(f"{where}: no 'preference'")
    out["preference"] = numbers(rec["preference"], f"{where}.preference", k, lo=0.0)
    scores = _mapping(rec.get("scores"), f"{where}.scores")
    checked = dict(scores)
    checked["heldout"] = numbers(scores.get("heldout"), f"{where}.scores.heldout", k)
    for split in ("search", "generated"):
        if scores.get(split) is not None:
            checked[split] = numbers(scores[split], f"{where}.scores.{split}", k)
    out["scores"] = checked
    if "path" not in rec:
        raise RunDocError(f"{where}: no 'path'")
    path = rec["path"]
    if not isinstance(path, list):
        raise RunDocError(f"{where}.path: expected a list of [model, layer] pairs, got {_show(path)}")
    steps = []
    for i, step in enumerate(path):
        if step is None:
            steps.append(None)
            continue
        if not isinstance(step, list) or len(step) != 2:
            raise RunDocError(f"{where}.path[{i}]: expected a [model name, layer index] pair, got {_show(step)}")
        steps.append([text(step[0], f"{where}.path[{i}][0]"), integer(step[1], f"{where}.path[{i}][1]", 0, INDEX_LIMIT)])
    if not any(s is not None for s in steps):
        raise RunDocError(f"{where}.path: runs no layer")
    out["path"] = steps
    out["shell"] = text(rec.get("shell"), f"{where}.shell")
    out["upper"] = check_upper(rec.get("upper"), f"{where}.upper")
    for flag in ("aligned", "dominated"):
        if flag in rec and not isinstance(rec[flag], bool):
            raise RunDocError(f"{where}.{flag}: expected true or false, got {_show(rec[flag])}")
    if rec.get("cost") is not None:
        cost = _mapping(rec["cost"], f"{where}.cost")
        for key, v in cost.items():
            if v is not None:
                number(v, f"{where}.cost.{key}")
    return out


def check_front(front: Any, path: str) -> dict:
    """front.json's document, checked (tasks, ideal and every solution); RunDocError otherwise."""
    front = _mapping(front, path)
    for key in ("tasks", "solutions", "ideal"):
        if key not in front:
            raise RunDocError(f"{path}: no {key!r} field")
    tasks = front["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise RunDocError(f"{path}: tasks: expected a non-empty list of task names, got {_show(tasks)}")
    for i, t in enumerate(tasks):
        text(t, f"{path}: tasks[{i}]")
    if len(set(tasks)) != len(tasks):
        raise RunDocError(f"{path}: tasks: names repeat ({', '.join(tasks)})")
    k = len(tasks)
    out = dict(front)
    out["ideal"] = numbers(front["ideal"], f"{path}: ideal", k)
    sols = front["solutions"]
    if not isinstance(sols, list):
        raise RunDocError(f"{path}: solutions: expected a list of solution records, got {_show(sols)}")
    if not sols:
        raise RunDocError(f"{path}: the front has no solutions")
    out["solutions"] = [check_solution(s, k, f"{path}: solutions[{i}]") for i, s in enumerate(sols)]
    return out


# ------------------------------------------------------------------------------------ zoo.json
def zoo_models(zoo_dir: str, manifest: Any, needed: list[str]) -> dict[str, str]:
    """{model name: directory} of a zoo manifest's "models", every directory a plain relative path
    that resolves inside `zoo_dir` (no absolute paths, no `..`, no symlink out), every name of
    `needed` present."""
    # loaded where used: recommend reads run documents without JAX (hm3jax.io and the search load it)
    from hm3jax.io import CheckpointError
    from hm3jax.io.paths import model_file

    where = os.path.join(zoo_dir, "zoo.json")
    models = _mapping(manifest, where).get("models")
    models = _mapping(models, f"{where}: models")
    missing = [n for n in needed if n not in models]
    if missing:
        raise RunDocError(f"{where}: models lists no {', '.join(missing)} (has {', '.join(models) or 'none'})")
    out = {}
    for name, sub in models.items():
        try:
            out[name] = model_file(zoo_dir, sub, f"{where}: models.{name}")
        except CheckpointError as e:
            raise RunDocError(f"{e} (a zoo's models lie inside its directory)") from None
    return out
