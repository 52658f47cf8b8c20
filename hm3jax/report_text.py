"""report.md's text, computed from a front.json document (hm3jax.report.build_front).

Sections: the held-out table at the centre preference with each method's front hypervolume, the
winner by hypervolume, the per-preference Tchebycheff table, HM3's solutions with their paths in a
readable form (path_text), where HM3 does not win, and the generated-answer scores when there are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from hm3jax.settings import BASE, MERGE

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
REFERENCE_MARGIN = 0.1  # the reference point lies this fraction of each objective's range below the nadir


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


def fmt_hv(x: float) -> str:
    """A hypervolume: 4 decimals, scientific notation below 0.001 (so small ones still differ)."""
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.3e}"


def label(method: str) -> str:
    """The report's name of a front.json method key."""
    return HM3_LABEL if method == HM3 else METHODS.get(method, method)


def _lam(p: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.2f}" for x in p) + ")"


def path_text(path: Sequence, merge: str = MERGE) -> str:
    """A path as `m0 m1 [code:2] - m4`: the merged model's layer i is `m{i}`, another model's layer
    i is `[name:i]`, a skipped position (None) is `-`."""
    out = []
    for step in path:
        if step is None:
            out.append("-")
        elif step[0] == merge:
            out.append(f"m{int(step[1])}")
        else:
            out.append(f"[{step[0]}:{int(step[1])}]")
    return " ".join(out) if out else "(no layer)"


def _ordered_methods(front: Mapping) -> list[str]:
    return [m for m in METHODS if m in front["baselines"]] + [m for m in front["baselines"] if m not in METHODS]


def table_rows(front: Mapping) -> list[tuple[str, list[float] | None, float | None]]:
    """(label, held-out scores at the centre preference or None, front hypervolume or None) per
    row: base, each expert, the baseline methods in METHODS order (others after), HM3 full."""
    tasks = front["tasks"]
    k = len(tasks)
    rows = []
    refs = front.get("references", {})
    for name in [BASE, *tasks]:
        if name in refs:
            rows.append(("Base" if name == BASE else f"Expert: {name}",
                         list(refs[name]["scores"]["heldout"]), None))
    for m in _ordered_methods(front):
        c = _centre(front["baselines"][m], k)
        rows.append((label(m), list(c["scores"]["heldout"]) if c else None, front["hypervolume"].get(m)))
    c = _centre(front["solutions"], k)
    rows.append((HM3_LABEL, list(c["scores"]["heldout"]) if c else None, front["hypervolume"].get(HM3)))
    return rows


# ------------------------------------------------------------------------------------ hypervolume
def winner(front: Mapping) -> tuple[str, float, str | None, float | None]:
    """(method, hypervolume, runner-up method or None, its hypervolume or None) by front hypervolume;
    ties go to the first method of front["hypervolume"] (HM3 first)."""
    ranked = sorted(front["hypervolume"].items(), key=lambda kv: -kv[1])
    (w, a), rest = ranked[0], ranked[1:]
    return (w, a, rest[0][0], rest[0][1]) if rest else (w, a, None, None)


def relative_gain(a: float, b: float) -> float:
    """How much a exceeds b, in % of b (inf when b is 0 and a is not)."""
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return 100.0 * (a - b) / b


def winner_sentence(front: Mapping) -> str:
    """The method with the largest front hypervolume and by how much it leads (relative %)."""
    if not front.get("hypervolume"):
        return ""
    w, a, r, b = winner(front)
    if r is None:
        return f"{label(w)} is the only method, front hypervolume {fmt_hv(a)}."
    if a == b:
        tied = [label(m) for m, v in front["hypervolume"].items() if v == a]
        return f"No single winner by front hypervolume: {', '.join(tied)} tie at {fmt_hv(a)}."
    text = (f"By front hypervolume, {label(w)} wins with {fmt_hv(a)}, {relative_gain(a, b):.1f}% above the "
            f"runner-up, {label(r)} ({fmt_hv(b)}).")
    hm3 = front["hypervolume"].get(HM3)
    if w != HM3 and r != HM3 and hm3 is not None:
        text += f" {HM3_LABEL} ({fmt_hv(hm3)}) is {-relative_gain(hm3, a):.1f}% below {label(w)}."
    return text


def hv_box_text(front: Mapping) -> str:
    """What the hypervolumes are measured in: the reference and ideal points, the objectives left out."""
    box = front.get("hypervolume_box")
    if box is None:  # a front.json of an older version
        return f"Front hypervolume above the reference point {front['reference_point']}."
    names = front.get("objectives", front["tasks"])

    def point(values):
        return ", ".join(f"{n} {v:.4g}" for n, v in zip(names, values) if n in box["objectives"])

    text = ("Front hypervolume: of each method's non-dominated solutions, with every objective scaled to "
            "[0, 1] between the reference point and the ideal point, both taken over every solution, "
            f"expert and the base: the ideal point is each objective's best value ({point(box['ideal'])}); "
            f"the reference point lies {100 * REFERENCE_MARGIN:.0f}% of the objective's range below its "
            f"worst value ({point(box['reference'])}), so a solution scoring 0 on a task still adds volume.")
    if box["left_out"]:
        text += (f" Left out of the volume (one value across all solutions): {', '.join(box['left_out'])}.")
    if not box["objectives"]:
        text += " No objective separates the solutions: every hypervolume is 0."
    return text


# ------------------------------------------------------------------------------------ Tchebycheff
def tchebycheff(scores: Sequence[float], preference: Sequence[float], ideal: Sequence[float]) -> float:
    """max_k λ_k |f_k - z*_k| (lower is better)."""
    return float(np.max(np.asarray(preference, float) * np.abs(np.asarray(scores, float) - np.asarray(ideal, float))))


def best_for(group: Sequence[Mapping], preference: Sequence[float], ideal: Sequence[float],
             searched_first: bool = True) -> tuple[int, float]:
    """(index, Tchebycheff value) of a method's answer for `preference`: its solution searched for it
    (the same preference) when `searched_first` and it has one, else the best of its solutions under it."""
    lam = np.asarray(preference, float)
    same = [i for i, s in enumerate(group) if searched_first and s.get("preference") is not None
            and len(s["preference"]) == len(lam) and np.allclose(s["preference"], lam, atol=1e-6)]
    pool = same or range(len(group))
    values = {i: tchebycheff(group[i]["scores"]["heldout"], lam, ideal) for i in pool}
    i = min(values, key=values.get)
    return i, values[i]


def tchebycheff_rows(front: Mapping) -> tuple[list[list[float]], list[tuple[str, list[float]]]]:
    """(HM3's preferences, [(row label, Tchebycheff value per preference)]): base, experts, baselines, HM3."""
    prefs = [list(s["preference"]) for s in front["solutions"]]
    ideal = front["ideal"]
    rows = []
    refs = front.get("references", {})
    for name in [BASE, *front["tasks"]]:
        if name in refs:
            rows.append(("Base" if name == BASE else f"Expert: {name}",
                         [tchebycheff(refs[name]["scores"]["heldout"], p, ideal) for p in prefs]))
    for m in [*_ordered_methods(front), HM3]:
        group = front["solutions"] if m == HM3 else front["baselines"][m]
        if group:
            rows.append((label(m), [best_for(group, p, ideal)[1] for p in prefs]))
    return prefs, rows


def tchebycheff_section(front: Mapping) -> list[str]:
    prefs, rows = tchebycheff_rows(front)
    if not prefs:
        return []
    best = [min(r[1][j] for r in rows) for j in range(len(prefs))]
    ideal = ", ".join(f"{t} {_fmt(z)}" for t, z in zip(front["tasks"], front["ideal"]))
    out = ["## Per preference", "",
           "Tchebycheff value max_k λ_k |f_k - z*_k| (x 100, lower is better) of held-out scores f under "
           f"each preference λ of HM3's search, z* = the ideal point ({ideal}: the best expert per task). "
           "A method's value is that of its solution searched for λ (the best of its solutions under λ "
           "where it has none for λ); the best of each column is in bold.", "",
           "| model | " + " | ".join(f"λ = {_lam(p)}" for p in prefs) + " |",
           "|---|" + "---|" * len(prefs)]
    for name, values in rows:
        cells = [f"**{100 * v:.2f}**" if v == best[j] else f"{100 * v:.2f}" for j, v in enumerate(values)]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + [""]


def solutions_section(front: Mapping) -> list[str]:
    tasks = front["tasks"]
    out = ["## HM3 solutions", "",
           "Each solution's held-out scores (x 100) and layer path: `m{i}` is layer i of the preference's "
           "merged model, `[name:i]` layer i of model `name`, `-` a skipped position.", "",
           "| λ | " + " | ".join(tasks) + " | front | layers | path |", "|---|" + "---|" * (len(tasks) + 3)]
    for s in front["solutions"]:
        n = sum(step is not None for step in s["path"])
        out.append(f"| {_lam(s['preference'])} | " + " | ".join(_fmt(x) for x in s["scores"]["heldout"])
                   + f" | {'no' if s['dominated'] else 'yes'} | {n} | `{path_text(s['path'])}` |")
    return out + [""]


# ------------------------------------------------------------------------------------ the rest
def where_hm3_does_not_win(front: Mapping) -> str:
    """A plain paragraph, computed from the numbers: undominated baselines, HV comparisons."""
    hv = front["hypervolume"]
    undominated = front.get("undominated_by_hm3", {})
    notes = []
    for name in undominated.get("references", []):
        s = front["references"][name]
        who = "the base model" if name == BASE else f"the {name} expert"
        notes.append(f"{who} (held-out {', '.join(_fmt(x) for x in s['scores']['heldout'])}) is not "
                     "dominated by any HM3 solution")
    for m, idx in undominated.get("baselines", {}).items():
        if not idx:
            continue
        group = front["baselines"][m]
        s = group[max(idx, key=lambda i: sum(group[i]["scores"]["heldout"]))]
        pref = [round(float(x), 3) for x in s.get("preference") or []]
        notes.append(f"{len(idx)} of {len(group)} {label(m)} solutions are not dominated by any "
                     f"HM3 solution (e.g. preference {pref}, held-out "
                     f"{', '.join(_fmt(x) for x in s['scores']['heldout'])})")
    beaten = [f"{label(m)} ({fmt_hv(v)})" for m, v in hv.items() if m != HM3 and v > hv.get(HM3, 0.0)]
    if beaten:
        notes.append(f"the front hypervolume of HM3 full ({fmt_hv(hv.get(HM3, 0.0))}) is below that of "
                     + ", ".join(beaten))
    order = [(HM3_LABEL, HM3), (METHODS[PARAM_ONLY], PARAM_ONLY), (METHODS[ARCH_ONLY], ARCH_ONLY)]
    present = [(name, hv[m]) for name, m in order if m in hv]
    order_sentence = ""
    if len(present) == 3:
        holds = present[0][1] > present[1][1] > present[2][1]
        order_sentence = (f"The paper's hypervolume order full > parameter-only > architecture-only "
                          f"{'holds' if holds else 'does NOT hold'} here: "
                          + ", ".join(f"{name} {fmt_hv(v)}" for name, v in present) + ".")
    if notes:
        para = "HM3 does not win everywhere: " + "; ".join(notes) + "."
    else:
        para = ("Every baseline solution and reference model is dominated by an HM3 solution, and no "
                "method's front hypervolume exceeds HM3 full's.")
    return (para + (" " + order_sentence if order_sentence else "")).strip()


def report_markdown(front: Mapping, title: str = "HM3 run report") -> str:
    """report.md: the held-out table with hypervolumes, the winner, the per-preference Tchebycheff
    table, HM3's solutions and paths, and the plain "where HM3 does not win" paragraph."""
    tasks = front["tasks"]
    lines = [f"# {title}", "",
             "Held-out scores (x 100) at the centre preference (each method's solution whose preference "
             "is nearest the uniform one), and each method's front hypervolume over all its preferences.",
             "", hv_box_text(front), "",
             "| model | " + " | ".join(tasks) + " | front HV |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for name, scores, h in table_rows(front):
        cells = [_fmt(x) for x in scores] if scores is not None else ["–"] * len(tasks)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if h is None else fmt_hv(h)} |")
    n_front = sum(not s["dominated"] for s in front["solutions"])
    lines += ["", winner_sentence(front), "",
              f"HM3: {len(front['solutions'])} solutions, {n_front} on its front.", ""]
    lines += tchebycheff_section(front) + solutions_section(front)
    lines += ["## Where HM3 does not win", "", where_hm3_does_not_win(front), ""]
    return "\n".join(lines + generated_section(front))


def generated_section(front: Mapping) -> list[str]:
    """report.md lines for the task scorers on generated held-out answers (tasks.kind files), or []."""
    refs = front.get("references") or {}
    rows = [(("Base" if name == BASE else f"Expert: {name}"), r["scores"].get("generated"))
            for name, r in refs.items()]
    rows += [(f"HM3 λ = {_lam(s['preference'])}", s["scores"].get("generated")) for s in front["solutions"]]
    if not any(g is not None for _, g in rows):
        return []
    tasks = front["tasks"]
    out = ["## Generated answers", "",
           "Each task's scorer (GSM8K answer match, chrF / 100, pass@1) on greedy answers to the first "
           "held-out prompts, x 100 (– : a path that switches models under alignment maps, which "
           "generation does not apply).", "",
           "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, g in rows:
        out.append(f"| {name} | " + " | ".join(_fmt(x) for x in g) + " |" if g is not None
                   else f"| {name} | " + " | ".join("–" for _ in tasks) + " |")
    return out + [""]
