"""Front plots written as PNG files (matplotlib's Agg canvas; no pyplot global state).

2 tasks: a scatter of every solution with the non-dominated ones highlighted and joined by the
front's staircase. 3 tasks: a 3-D scatter beside a parallel-coordinates view. More tasks: parallel
coordinates only. Other point sets (baselines, experts) can be overlaid with their own labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from hm3jax.moo.pareto import pareto_mask

_FRONT_COLOR = "tab:red"
_OTHER_MARKERS = ("s", "^", "D", "v", "P", "X", "*", "<", ">")
_OTHER_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan")


def plot_front(
    out_path: str | os.PathLike,
    scores,
    task_names: Sequence[str] | None = None,
    others: Mapping[str, object] | None = None,
    title: str | None = None,
    label: str = "solutions",
) -> str:
    """Write a PNG of the solutions in objective space (higher is better on every axis).

    Args:
      out_path: PNG file to write (parent folders are created).
      scores: [N, K] scores, K >= 2; the non-dominated rows are highlighted.
      task_names: K axis labels (default "task 0", ...).
      others: optional {label: [M, K] scores} drawn as separate marked groups (e.g. baselines).
      title: figure title.
      label: legend label of `scores`.

    Returns:
      out_path as a string.
    """
    # matplotlib is imported here, when a plot is drawn, so `import hm3jax.moo` stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = _as_scores("scores", scores, None)
    k = s.shape[1]
    if k < 2:
        raise ValueError(f"plot_front: need at least 2 tasks (columns) to plot a front, got {k}")
    names = list(task_names) if task_names is not None else [f"task {i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"plot_front: {len(names)} task_names for {k} score columns")
    groups = {name: _as_scores(f"others[{name!r}]", v, k) for name, v in (others or {}).items()}
    front = np.asarray(pareto_mask(s)) if len(s) else np.zeros(0, bool)

    if k == 2:
        fig = Figure(figsize=(6, 5))
        _scatter_2d(fig.add_subplot(1, 1, 1), s, front, names, groups, label)
    elif k == 3:
        fig = Figure(figsize=(12, 5))
        _scatter_3d(fig.add_subplot(1, 2, 1, projection="3d"), s, front, names, groups, label)
        _parallel(fig.add_subplot(1, 2, 2), s, front, names, groups, label)
    else:
        fig = Figure(figsize=(max(6, 1.5 * k), 5))
        _parallel(fig.add_subplot(1, 1, 1), s, front, names, groups, label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(out_path)
    return out_path


def _as_scores(where: str, x, k: int | None) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or (k is not None and a.shape[1] != k):
        want = "[N, K]" if k is None else f"[M, {k}]"
        raise ValueError(f"plot_front: {where} must be {want} (solutions x tasks), got shape {a.shape}")
    return a


def _scatter_2d(ax, s, front, names, groups, label):
    if (~front).any():  # no legend entry for dominated solutions when there are none
        ax.scatter(s[~front, 0], s[~front, 1], c="lightgray", edgecolors="gray", label=f"{label} (dominated)")
    f = s[front][np.argsort(-s[front, 0])]
    if len(f):
        # The front's staircase: from the best on task 0 leftwards, each step up to the next point.
        ax.step(f[:, 0], f[:, 1], where="post", color=_FRONT_COLOR, alpha=0.6)
        ax.scatter(f[:, 0], f[:, 1], c=_FRONT_COLOR, label=f"{label} (front)", zorder=3)
    for name, g, m, c in _styled(groups):
        ax.scatter(g[:, 0], g[:, 1], marker=m, color=c, label=name, zorder=4)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _scatter_3d(ax, s, front, names, groups, label):
    if (~front).any():
        ax.scatter(*s[~front].T, c="lightgray", edgecolors="gray", label=f"{label} (dominated)")
    ax.scatter(*s[front].T, c=_FRONT_COLOR, label=f"{label} (front)", depthshade=False)
    for name, g, m, c in _styled(groups):
        ax.scatter(*g.T, marker=m, color=c, label=name, depthshade=False)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_zlabel(names[2])
    ax.legend(fontsize="small")


def _parallel(ax, s, front, names, groups, label):
    x = np.arange(s.shape[1])
    # One polyline per solution; the legend gets one entry per group, not per line.
    for i, row in enumerate(s[~front]):
        ax.plot(x, row, color="lightgray", lw=1, label=f"{label} (dominated)" if i == 0 else None)
    for i, row in enumerate(s[front]):
        ax.plot(x, row, color=_FRONT_COLOR, lw=1.5, marker="o", label=f"{label} (front)" if i == 0 else None)
    for name, g, m, c in _styled(groups):
        for i, row in enumerate(g):
            ax.plot(x, row, ls="--", marker=m, color=c, label=name if i == 0 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _styled(groups):
    """(name, scores, marker, color) per group; a group keeps one color across all its rows."""
    for i, (name, g) in enumerate(groups.items()):
        yield name, g, _OTHER_MARKERS[i % len(_OTHER_MARKERS)], _OTHER_COLORS[i % len(_OTHER_COLORS)]


def plot_pairs(
    out_paths: Sequence[str | os.PathLike | tuple[str | os.PathLike, str]],
    scores,
    names: Sequence[str],
    others: Mapping[str, object] | None = None,
    points: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
    label: str = "solutions",
) -> list[str]:
    """Pairwise 2-D projections of D >= 2 objectives (higher is better on every axis), written to each
    of `out_paths` (the format from the suffix: .png, .svg, .pdf; or (path, format) pairs).

    Args:
      scores: [N, D] the main solutions; the non-dominated rows (over all D objectives) are
        highlighted, the others drawn in grey.
      names: D axis labels.
      others: {label: [M, D]} groups drawn with their own marker (e.g. the baselines).
      points: {label: [D]} single points drawn on their own (e.g. the base and each expert).
    One panel per pair of objectives; every point is a marker (no joined lines: a projection of a
    front is not a front); one legend outside the panels, on the right.
    """
    # matplotlib is heavy: loaded only when a plot is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = _as_scores("scores", scores, None)
    d = s.shape[1]
    if d < 2 or len(names) != d:
        raise ValueError(f"plot_pairs: need D >= 2 objectives and D names, got {d} columns, {len(names)} names")
    groups = {n: _as_scores(f"others[{n!r}]", v, d) for n, v in (others or {}).items()}
    singles = {n: np.asarray(v, np.float64).reshape(d) for n, v in (points or {}).items()}
    front = np.asarray(pareto_mask(s)) if len(s) else np.zeros(0, bool)
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    cols = min(len(pairs), 3)
    rows = -(-len(pairs) // cols)
    fig = Figure(figsize=(4.2 * cols + 2.8, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    single_markers = ("s", "*", "P", "X", "h", "p", "8")
    for ax, (i, j) in zip(axes, pairs):
        if (~front).any():  # no legend entry for dominated solutions when there are none
            ax.scatter(s[~front, i], s[~front, j], c="lightgray", edgecolors="gray", s=22,
                       label=f"{label} (dominated)")
        ax.scatter(s[front, i], s[front, j], c=_FRONT_COLOR, s=30, label=f"{label} (front)", zorder=3)
        for name, g, m, c in _styled(groups):
            ax.scatter(g[:, i], g[:, j], marker=m, color=c, s=22, alpha=0.8, label=name, zorder=2)
        for k, (name, p) in enumerate(singles.items()):
            ax.scatter([p[i]], [p[j]], marker=single_markers[k % len(single_markers)], s=90, color="black"
                       if k == 0 else _OTHER_COLORS[(k + 3) % len(_OTHER_COLORS)], edgecolors="black",
                       label=name, zorder=5)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    if title:
        fig.suptitle(title)
    written = []
    canvas = FigureCanvasAgg(fig)
    for out in out_paths:
        out, fmt = (os.fspath(out[0]), out[1]) if isinstance(out, tuple) else (os.fspath(out), None)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fmt = fmt or os.path.splitext(out)[1].lstrip(".").lower() or "png"
        canvas.print_figure(out, format=fmt, dpi=120)
        written.append(out)
    return written
