"""The run's front and report: dominance, hypervolumes, front.json, front.png and report.md.

Inputs are solution records (dicts, the format of `hm3jax_solution.json`):

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
Hypervolume: of each method's solutions, above the reference point 0 on every task score (exact
match is in [0, 1], so 0 is the worst possible) and -1.1 on the cost objective (10% beyond the
costliest solution).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hm3jax.io.atomic import write_json_atomic
from hm3jax.moo import hypervolume, pareto_mask, plot_front

FRONT_FILE = "front.json"
PLOT_FILE = "front.png"
REPORT_FILE = "report.md"
HM3 = "hm3"
PARAM_ONLY = "param_only"
ARCH_ONLY = "arch_only"
# Baseline methods in report order, with their row labels (HM3 full comes last).
METHODS = {
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "dare_ties": "DARE-TIES",
    "random_path": "Random path search",
    "evolutionary_path": "Evolutionary path search",
    PARAM_ONLY: "HM3 parameter level only",
    ARCH_ONLY: "HM3 architecture level only",
}
HM3_LABEL = "HM3 full"
COST_REFERENCE = -1.1


def _upper_value(key: str, v):
    if v is None or isinstance(v, str):
        return v
    if key == "key_data":
        return [int(x) for x in np.asarray(v).reshape(-1)]
    return int(v) if key == "seed" else float(v)


def make_solution(preference: Sequence[float], upper: Mapping[str, Any] | None, path: Sequence,
                  shell: str, search: Sequence[float], heldout: Sequence[float],
                  cost: Mapping[str, Any] | None = None, aligned: bool = False) -> dict:
    """A solution record in the module docstring's format (plain JSON types; "dominated" False
    until build_front sets it).

    Args:
      preference: [K] λ. upper: {"method", "density", "scale", "seed"} of the upper-level merge
        ("seed": the int s of the key jax.random.key(s) the merge used; recommend --export rebuilds
        the merge with it), optionally "key_data": the raw data of the merge's key
        (`jax.random.key_data(key)`, for a key split off another, as run_upper does), which
        recommend uses instead of "seed"; or None for a solution without one (e.g. an expert).
      path: (model name, layer) pairs (None for a skipped step). shell: the shell's model name.
      search, heldout: [K] scores. cost: e.g. hm3jax.cost.path_cost(...).to_dict().
      aligned: the scores were measured with alignment maps at the path's model switches
        (lower.align), which an exported checkpoint cannot hold; the key is written only when True.
    """
    up = None if upper is None else {k: _upper_value(k, v) for k, v in upper.items()}
    return {"preference": [float(x) for x in preference], "upper": up,
            "path": [None if s is None else [str(s[0]), int(s[1])] for s in path], "shell": str(shell),
            "scores": {"search": [float(x) for x in search], "heldout": [float(x) for x in heldout]},
            "cost": dict(cost) if cost is not None else None, "dominated": False,
            **({"aligned": True} if aligned else {})}


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


def reference_point(k: int, cost: bool) -> np.ndarray:
    """The hypervolume reference point: 0 per task score, COST_REFERENCE for the cost objective."""
    return np.asarray([0.0] * k + ([COST_REFERENCE] if cost else []))


def front_hypervolume(obj: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of the rows of `obj` above `ref` (0 for no rows)."""
    if len(obj) == 0:
        return 0.0
    return float(hypervolume(obj[np.asarray(pareto_mask(obj))], ref))


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
    Returns {"tasks", "objectives", "reference_point", "ideal", "solutions", "baselines",
      "references", "hypervolume": {"hm3", one per baseline method}, "undominated_by_hm3":
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
    ref = reference_point(k, cost_objective)
    objs = {m: objectives(g, k, scale, where=m if m != HM3 else "solutions") for m, g in groups.items()}
    out_groups: dict[str, list[dict]] = {}
    hv: dict[str, float] = {}
    for m, g in groups.items():
        mask = np.asarray(pareto_mask(objs[m])) if len(g) else np.zeros(0, bool)
        out_groups[m] = [{**s, "dominated": not bool(keep)} for s, keep in zip(g, mask)]
        hv[m] = front_hypervolume(objs[m], ref)
    ref_objs = objectives(list(references.values()), k, scale, where="references")
    refs = {n: {**s, "dominated": bool(d)} for (n, s), d in
            zip(references.items(), _dominated_by(ref_objs, objs[HM3]))}
    if ideal is None:
        experts = [s for n, s in references.items() if n != "base"]
        pool = heldout(experts, k, "references") if experts else objs[HM3][:, :k]
        ideal = pool.max(axis=0).tolist() if len(pool) else [1.0] * k
    if len(ideal) != k:
        raise ValueError(f"ideal has {len(ideal)} values for {k} tasks")
    undominated = {"baselines": {m: [int(i) for i in np.flatnonzero(~_dominated_by(objs[m], objs[HM3]))]
                                 for m in groups if m != HM3},
                   "references": [n for n, s in refs.items() if not s["dominated"]]}
    return {
        "tasks": list(tasks),
        "objectives": list(tasks) + (["-flops_per_token (relative)"] if cost_objective else []),
        "reference_point": ref.tolist(),
        "ideal": [float(x) for x in ideal],
        "solutions": out_groups[HM3],
        "baselines": {m: out_groups[m] for m in groups if m != HM3},
        "references": refs,
        "hypervolume": hv,
        "undominated_by_hm3": undominated,
    }


# ------------------------------------------------------------------------------------ the report
def _centre(solutions: Sequence[Mapping], k: int) -> Mapping | None:
    """The solution whose preference is nearest the uniform one (the first without preferences)."""
    if not solutions:
        return None
    u = np.full(k, 1.0 / k)

    def dist(s):
        p = s.get("preference")
        return float(np.sum((np.asarray(p, float) - u) ** 2)) if p is not None and len(p) == k else np.inf

    return min(solutions, key=dist)


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def table_rows(front: Mapping) -> list[tuple[str, list[float] | None, float | None]]:
    """(label, held-out scores at the centre preference or None, front hypervolume or None) per
    row: base, each expert, the baseline methods in METHODS order (others after), HM3 full."""
    tasks = front["tasks"]
    k = len(tasks)
    rows = []
    refs = front.get("references", {})
    for name in ["base", *tasks]:
        if name in refs:
            rows.append(("Base" if name == "base" else f"Expert: {name}",
                         list(refs[name]["scores"]["heldout"]), None))
    order = [m for m in METHODS if m in front["baselines"]] + [m for m in front["baselines"] if m not in METHODS]
    for m in order:
        c = _centre(front["baselines"][m], k)
        rows.append((METHODS.get(m, m), list(c["scores"]["heldout"]) if c else None,
                     front["hypervolume"].get(m)))
    c = _centre(front["solutions"], k)
    rows.append((HM3_LABEL, list(c["scores"]["heldout"]) if c else None, front["hypervolume"].get(HM3)))
    return rows


def where_hm3_does_not_win(front: Mapping) -> str:
    """A plain paragraph, computed from the numbers: undominated baselines, HV comparisons."""
    hv = front["hypervolume"]
    undominated = front.get("undominated_by_hm3", {})
    notes = []
    for name in undominated.get("references", []):
        s = front["references"][name]
        label = "the base model" if name == "base" else f"the {name} expert"
        notes.append(f"{label} (held-out {', '.join(_fmt(x) for x in s['scores']['heldout'])}) is not "
                     "dominated by any HM3 solution")
    for m, idx in undominated.get("baselines", {}).items():
        if not idx:
            continue
        group = front["baselines"][m]
        s = group[max(idx, key=lambda i: sum(group[i]["scores"]["heldout"]))]
        pref = [round(float(x), 3) for x in s.get("preference") or []]
        notes.append(f"{len(idx)} of {len(group)} {METHODS.get(m, m)} solutions are not dominated by any "
                     f"HM3 solution (e.g. preference {pref}, held-out "
                     f"{', '.join(_fmt(x) for x in s['scores']['heldout'])})")
    beaten = [f"{METHODS.get(m, m)} ({v:.4f})" for m, v in hv.items() if m != HM3 and v > hv.get(HM3, 0.0)]
    if beaten:
        notes.append(f"the front hypervolume of HM3 full ({hv.get(HM3, 0.0):.4f}) is below that of "
                     + ", ".join(beaten))
    order = [(HM3_LABEL, HM3), (METHODS[PARAM_ONLY], PARAM_ONLY), (METHODS[ARCH_ONLY], ARCH_ONLY)]
    present = [(label, hv[m]) for label, m in order if m in hv]
    order_sentence = ""
    if len(present) == 3:
        holds = present[0][1] > present[1][1] > present[2][1]
        order_sentence = (f"The paper's hypervolume order full > parameter-only > architecture-only "
                          f"{'holds' if holds else 'does NOT hold'} here: "
                          + ", ".join(f"{label} {v:.4f}" for label, v in present) + ".")
    if notes:
        para = "HM3 does not win everywhere: " + "; ".join(notes) + "."
    else:
        para = ("Every baseline solution and reference model is dominated by an HM3 solution, and no "
                "method's front hypervolume exceeds HM3 full's.")
    return (para + (" " + order_sentence if order_sentence else "")).strip()


def report_markdown(front: Mapping, title: str = "HM3 run report") -> str:
    """report.md: a Table-1-like held-out table and the plain "where HM3 does not win" paragraph."""
    tasks = front["tasks"]
    lines = [f"# {title}", "",
             "Held-out scores (x 100) at the centre preference (each method's solution whose preference "
             "is nearest the uniform one), and each method's front hypervolume over all its "
             f"preferences (reference point {front['reference_point']}"
             + (", the last coordinate on -relative FLOPs per token" if len(front["reference_point"]) > len(tasks) else "")
             + ").", "",
             "| model | " + " | ".join(tasks) + " | front HV |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for label, scores, h in table_rows(front):
        cells = [_fmt(x) for x in scores] if scores is not None else ["–"] * len(tasks)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'–' if h is None else f'{h:.4f}'} |")
    n_front = sum(not s["dominated"] for s in front["solutions"])
    lines += ["", f"HM3: {len(front['solutions'])} solutions, {n_front} on its front.", "",
              "## Where HM3 does not win", "", where_hm3_does_not_win(front), ""]
    return "\n".join(lines + generated_section(front))


def generated_section(front: Mapping) -> list[str]:
    """report.md lines for the task scorers on generated held-out answers (tasks.kind files), or []."""
    refs = front.get("references") or {}
    rows = [(("Base" if name == "base" else f"Expert: {name}"), r["scores"].get("generated"))
            for name, r in refs.items()]
    rows += [(f"HM3 λ = ({', '.join(f'{x:.2f}' for x in s['preference'])})", s["scores"].get("generated"))
             for s in front["solutions"]]
    if not any(g is not None for _, g in rows):
        return []
    tasks = front["tasks"]
    out = ["## Generated answers", "",
           "Each task's scorer (GSM8K answer match, chrF / 100, pass@1) on greedy answers to the first "
           "held-out prompts, x 100 (– : a path that switches models under alignment maps, which "
           "generation does not apply).", "",
           "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, g in rows:
        out.append(f"| {label} | " + " | ".join(_fmt(x) for x in g) + " |" if g is not None
                   else f"| {label} | " + " | ".join("–" for _ in tasks) + " |")
    return out + [""]


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
    """Write front.json, front.png and report.md into `run_dir` (each atomically: a temporary
    sibling renamed into place). Numpy and JAX numbers in the records are written as plain JSON
    numbers. Returns {file name: path}."""
    run_dir = os.fspath(run_dir)
    front = _plain(front)
    os.makedirs(run_dir, exist_ok=True)
    k = len(front["tasks"])
    paths = {f: os.path.join(run_dir, f) for f in (FRONT_FILE, PLOT_FILE, REPORT_FILE)}
    write_json_atomic(paths[FRONT_FILE], front)
    hm3 = heldout(front["solutions"], k, "solutions")
    others: dict[str, Any] = {METHODS.get(m, m): heldout(v, k, m)
                              for m, v in front["baselines"].items() if v}
    refs = front.get("references", {})
    if refs:
        others["base + experts"] = heldout(list(refs.values()), k, "references")
    if k >= 2:
        _write_via_temp(paths[PLOT_FILE], lambda p: plot_front(
            p, hm3, front["tasks"], others=others, title="held-out scores", label=HM3_LABEL))
    else:
        paths.pop(PLOT_FILE)
    report = report_markdown(front)

    def put(p):
        with open(p, "w") as f:
            f.write(report)

    _write_via_temp(paths[REPORT_FILE], put)
    return paths
