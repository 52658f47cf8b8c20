"""The run's front and report: dominance, hypervolumes, front.json, front.png and report.md.

Inputs are solution records (dicts, the format of `hm3jax_solution.json`: hm3jax.run.record's
Solution.to_json()):

    {"preference": [K floats], "upper": {"method", "density", "scale", "seed"},
     "path": [[model name, layer], ...], "shell": model name,
     "scores": {"search": [K], "heldout": [K]},
     "cost": {"layers", "parameters", "flops_per_token"}, "dominated": bool,
     "aligned": true (only for paths that switch models, scored with lower.align's maps)}

HM3's solutions, the baselines' ({method: [solutions]}, methods named as in METHODS: the
parameter-level merges, the path searches and the HM3 ablations), and single reference models
({"base": solution, <task>: its expert's solution}).

Objectives: the held-out score of each task (higher is better) and, when the cost objective is on,
the relative inference cost -flops_per_token / F, F = the largest flops_per_token among all
solutions and references (so every cost objective lies in [-1, 0)).
Dominance: a solution's "dominated" flag says whether another solution *of the same method* beats
it (>= on every objective, > on one); HM3's non-dominated solutions are its front. Across methods,
`undominated_by_hm3` lists the other solutions that no HM3 solution dominates.
Hypervolume: of each method's non-dominated solutions, in the ideal box normalised to [0, 1] per
objective. Over every solution of every method and the references, the box's top is the best value
of each objective (the ideal point) and its bottom, the reference point, lies 10% of the objective's
range below its worst value (the nadir), so a solution scoring 0 on a task still adds volume; each
objective x is scaled to (x - reference) / (ideal - reference). An objective with one value across
all those solutions cannot separate them and is left out of the volume (front.json's
"hypervolume_box" names it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from hm3jax.io.atomic import write_json_atomic
from hm3jax.moo import hypervolume, pareto_mask, plot_pairs
from hm3jax.report_text import (  # report.md's text; the method names and labels live there
    ARCH_ONLY,
    HM3,
    HM3_LABEL,
    MERGE,
    METHODS,
    PARAM_ONLY,
    REFERENCE_MARGIN,
    generated_section,
    path_text,
    report_markdown,
    table_rows,
    where_hm3_does_not_win,
    winner_sentence,
)
from hm3jax.rundoc import round_floats
from hm3jax.settings import BASE

FRONT_FILE = "front.json"
PLOT_FILE = "front.png"
SVG_FILE = "front.svg"
REPORT_FILE = "report.md"
COST_NAME = "-flops_per_token (relative)"


# ------------------------------------------------------------------------------------ objectives
def heldout(solutions: Sequence[Mapping], k: int, where: str) -> np.ndarray:
    """[N, K] held-out scores of `solutions` (ValueError naming the solution when malformed)."""
    rows = []
    for i, s in enumerate(solutions):
        try:
            row = [float(x) for x in s["scores"]["heldout"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}[{i}]: no scores.heldout list of numbers") from None
        if len(row) != k:
            raise ValueError(f"{where}[{i}]: scores.heldout has {len(row)} values for {k} tasks")
        rows.append(row)
    return np.asarray(rows, np.float64).reshape(len(rows), k)


def _flops(solutions: Sequence[Mapping], where: str) -> np.ndarray:
    try:
        return np.asarray([float(s["cost"]["flops_per_token"]) for s in solutions], np.float64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: the cost objective needs cost.flops_per_token on every solution") from None


def objectives(solutions: Sequence[Mapping], k: int, cost_scale: float | None = None,
               where: str = "solutions") -> np.ndarray:
    """[N, K] held-out scores, plus a column -flops_per_token / cost_scale when cost_scale is given."""
    s = heldout(solutions, k, where)
    if cost_scale is None:
        return s
    return np.concatenate([s, -_flops(solutions, where)[:, None] / cost_scale], axis=1)


def hypervolume_box(obj: np.ndarray, names: Sequence[str]) -> dict:
    """The normalised box of the hypervolumes: {"objectives": the names used, "left_out": the
    constant ones, "reference": [D] reference point (REFERENCE_MARGIN of the range below the nadir;
    a constant objective's value), "ideal": [D] best value per objective}, over the rows of `obj`."""
    if len(obj) == 0:
        return {"objectives": [], "left_out": list(names), "reference": [0.0] * len(names),
                "ideal": [0.0] * len(names)}
    hi, lo = obj.max(axis=0), obj.min(axis=0)
    span = hi - lo
    keep = span > 1e-12 * np.maximum(1.0, np.abs(hi))
    ref = np.where(keep, lo - REFERENCE_MARGIN * span, lo)
    return {"objectives": [n for n, k in zip(names, keep) if k],
            "left_out": [n for n, k in zip(names, keep) if not k],
            "reference": ref.tolist(), "ideal": hi.tolist()}


def front_hypervolume(obj: np.ndarray, box: Mapping, names: Sequence[str]) -> float:
    """Hypervolume of the non-dominated rows of `obj` (columns: `names`) in the normalised box of
    hypervolume_box (0 for no rows or no objective left in the box)."""
    keep = np.asarray([n in box["objectives"] for n in names], bool)
    if len(obj) == 0 or not keep.any():
        return 0.0
    ref, top = np.asarray(box["reference"])[keep], np.asarray(box["ideal"])[keep]
    scaled = (obj[:, keep] - ref) / (top - ref)
    return float(hypervolume(scaled[np.asarray(pareto_mask(scaled))], np.zeros(int(keep.sum()))))


def _dominated_by(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [len(a)]: whether some row of b dominates each row of a."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    ge = np.all(b[None, :, :] >= a[:, None, :], axis=-1)
    gt = np.any(b[None, :, :] > a[:, None, :], axis=-1)
    return np.any(ge & gt, axis=1)


# ------------------------------------------------------------------------------------ the front
def build_front(tasks: Sequence[str], solutions: Sequence[Mapping], baselines: Mapping[str, Sequence[Mapping]],
                references: Mapping[str, Mapping] | None = None, cost_objective: bool = False,
                ideal: Sequence[float] | None = None) -> dict:
    """The front.json document (pure).

    Args:
      tasks: K task names. solutions: HM3's solution records. baselines: {method: [records]}
        (METHODS' names, plus any other). references: {"base": record, <task>: expert record}.
      cost_objective: add the relative cost as an objective (module docstring).
      ideal: [K] ideal point for recommend's Tchebycheff value; default the best held-out score per
        task among the references other than "base" (the experts), or among all solutions if none.
    Returns {"tasks", "objectives", "reference_point" (the hypervolume box's), "hypervolume_box"
      (hypervolume_box: objectives used, left out, reference and ideal points), "ideal",
      "solutions", "baselines", "references", "hypervolume": {"hm3", one per baseline method},
      "undominated_by_hm3":
      {"baselines": {method: [indices of its solutions no HM3 solution dominates]}, "references":
      [names of reference models no HM3 solution dominates]}}. Every record is a copy with its
      "dominated" flag set (for references: dominated by an HM3 solution).
    """
    k = len(tasks)
    references = dict(references or {})
    groups = {HM3: list(solutions), **{m: list(v) for m, v in baselines.items()}}
    scale = None
    if cost_objective:
        every = [s for g in groups.values() for s in g] + list(references.values())
        f = _flops(every, "solutions") if every else np.ones(1)
        scale = float(max(f.max(), 1e-30))
    names = list(tasks) + ([COST_NAME] if cost_objective else [])
    objs = {m: objectives(g, k, scale, where=m if m != HM3 else "solutions") for m, g in groups.items()}
    ref_objs = objectives(list(references.values()), k, scale, where="references")
    box = hypervolume_box(np.concatenate([*objs.values(), ref_objs], axis=0), names)
    out_groups: dict[str, list[dict]] = {}
    hv: dict[str, float] = {}
    for m, g in groups.items():
        mask = np.asarray(pareto_mask(objs[m])) if len(g) else np.zeros(0, bool)
        out_groups[m] = [{**s, "dominated": not bool(keep)} for s, keep in zip(g, mask)]
        hv[m] = front_hypervolume(objs[m], box, names)
    refs = {n: {**s, "dominated": bool(d)} for (n, s), d in
            zip(references.items(), _dominated_by(ref_objs, objs[HM3]))}
    if ideal is None:
        experts = [s for n, s in references.items() if n != BASE]
        pool = heldout(experts, k, "references") if experts else objs[HM3][:, :k]
        ideal = pool.max(axis=0).tolist() if len(pool) else [1.0] * k
    if len(ideal) != k:
        raise ValueError(f"ideal has {len(ideal)} values for {k} tasks")
    undominated = {"baselines": {m: [int(i) for i in np.flatnonzero(~_dominated_by(objs[m], objs[HM3]))]
                                 for m in groups if m != HM3},
                   "references": [n for n, s in refs.items() if not s["dominated"]]}
    return {
        "tasks": list(tasks),
        "objectives": names,
        "reference_point": box["reference"],
        "hypervolume_box": box,
        "ideal": [float(x) for x in ideal],
        "solutions": out_groups[HM3],
        "baselines": {m: out_groups[m] for m in groups if m != HM3},
        "references": refs,
        "hypervolume": hv,
        "undominated_by_hm3": undominated,
    }


# ------------------------------------------------------------------------------------ writing
def _write_via_temp(path: str, write) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _plain(x):
    """JSON-ready copy: numpy scalars and arrays become Python numbers and lists, tuples lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray) or (hasattr(x, "__array__") and not isinstance(x, (str, bytes))):
        a = np.asarray(x)
        return _plain(a.tolist()) if a.ndim else a.item()
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_front(run_dir: str | os.PathLike, front: Mapping) -> dict[str, str]:
    """Write front.json, front.png, front.svg and report.md into `run_dir` (each atomically: a
    temporary sibling renamed into place). Numpy and JAX numbers in the records are written as plain
    JSON numbers, floats rounded to 6 significant digits (rundoc.round_floats); report.md is made from the
    numbers as stored. Returns {file name: path}."""
    run_dir = os.fspath(run_dir)
    front = round_floats(_plain(front))
    os.makedirs(run_dir, exist_ok=True)
    k = len(front["tasks"])
    paths = {f: os.path.join(run_dir, f) for f in (FRONT_FILE, PLOT_FILE, SVG_FILE, REPORT_FILE)}
    write_json_atomic(paths[FRONT_FILE], front)
    names = front.get("objectives") or front["tasks"]
    cost = len(names) > k
    scale = None
    if cost:  # the stored relative costs' scale: the largest flops among all records
        every = front["solutions"] + [s for v in front["baselines"].values() for s in v] \
            + list(front.get("references", {}).values())
        scale = float(max(_flops(every, "solutions").max(), 1e-30))
    axes = list(front["tasks"]) + (["relative cost (-FLOPs/token)"] if cost else [])
    hm3 = objectives(front["solutions"], k, scale, "solutions")
    others = {METHODS.get(m, m): objectives(v, k, scale, m) for m, v in front["baselines"].items() if v}
    refs = front.get("references", {})
    points = {(BASE if n == BASE else f"expert: {n}"): objectives([s], k, scale, "references")[0]
              for n, s in refs.items()}
    if len(axes) >= 2:
        for name, fmt in ((PLOT_FILE, "png"), (SVG_FILE, "svg")):
            _write_via_temp(paths[name], lambda p, fmt=fmt: plot_pairs(
                [(p, fmt)], hm3, axes, others=others, points=points, label=HM3_LABEL,
                title="held-out scores, pairwise (higher is better)"))
    else:
        paths.pop(PLOT_FILE)
        paths.pop(SVG_FILE)
    report = report_markdown(front)

    def put(p):
        with open(p, "w") as f:
            f.write(report)

    _write_via_temp(paths[REPORT_FILE], put)
    return paths


__all__ = ["ARCH_ONLY", "HM3", "HM3_LABEL", "MERGE", "METHODS", "PARAM_ONLY", "build_front", "generated_section", "path_text", "report_markdown",
           "round_floats", "table_rows", "where_hm3_does_not_win", "winner_sentence", "write_front"]
