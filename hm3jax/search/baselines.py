"""Parameter-level baseline fronts: TA, TIES and DARE-TIES at N preferences, scored on held-out data.

    python -m hm3jax.search.baselines ZOO_DIR [--preferences 10] [--grid] [--seed 0] [--out FILE.json]

Prints a table like the paper's Table 1 (rows: base, the experts, each method at the centre
preference; columns: tasks) and each method's front hypervolume (reference point: all-zero scores
for exact match; the base model's scores with --objective loglik). Every preference's merge is scored
in memory: merges and scoring are vmapped over the preferences.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.io.atomic import check_output_path, check_writable, write_json_atomic
from hm3jax.log import add_verbosity_flags, setup_logging
from hm3jax.moo import das_dennis, dirichlet, hypervolume, pareto_mask
from hm3jax.objectives import make_suite_batch
from hm3jax.objectives import tasks as task_suite
from hm3jax.objectives.scoring import SCORE_OBJECTIVES, make_params_scorer
from hm3jax.rundoc import round_floats
from hm3jax.search.upper import UPPER_METHODS, merge_for_preference
from hm3jax.settings import BASE
from hm3jax.zoo import load_zoo

log = logging.getLogger(__name__)

SCORER_OBJECTIVES = SCORE_OBJECTIVES


def make_scorer(cfg, batch, num_tasks: int, objective: str = "exact_match") -> Callable[[dict], jax.Array]:
    """params -> [K] per-task scores on `batch` (see objectives.scoring.make_params_scorer)."""
    return make_params_scorer(cfg, batch, num_tasks, objective)


def preferences(k: int, n: int, seed: int = 0, grid: bool = False) -> np.ndarray:
    """[N, K] preference vectors: Dirichlet(1) draws, or a Das-Dennis grid with >= n points."""
    if not grid:
        return np.asarray(dirichlet(n, k, seed))
    divisions = 1
    while len(das_dennis(k, divisions)) < n:
        divisions += 1
    return np.asarray(das_dennis(k, divisions))


def baseline_front(cfg, base: dict, experts: Sequence[dict], score: Callable[[dict], jax.Array],
                   prefs: np.ndarray, key: jax.Array, methods: Sequence[str] = UPPER_METHODS,
                   density: float = 0.7, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Scores [N, K] of each method's merge at each preference (method -> array)."""
    out = {}
    for m in methods:
        @jax.jit
        def run(p, m=m):
            return jax.vmap(lambda lam: score(merge_for_preference(m, base, experts, lam, key,
                                                                   density, scale)))(p)
        out[m] = np.asarray(run(jnp.asarray(prefs, jnp.float32)))
    return out


def format_table(names: Sequence[str], rows: dict[str, np.ndarray], hv: dict[str, float],
                 percent: bool = True) -> str:
    """A Markdown table: one row per model/method, one column per task, plus hypervolume.

    percent: print scores x 100 with one decimal (exact match); else as they are, three decimals.
    """
    head = "| model | " + " | ".join(names) + " | front HV |\n|---|" + "---|" * (len(names) + 1)
    lines = [head]
    for r, v in rows.items():
        h = f"{hv[r]:.4f}" if r in hv else ""
        cells = (f"{100 * x:.1f}" if percent else f"{x:.3f}" for x in v)
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {h} |")
    return "\n".join(lines)


MAX_PREFERENCES = 100_000


class BaselineArgError(ValueError):
    """A command-line value of the baselines CLI that cannot be used (names the flag)."""


def check_args(args) -> None:
    """Refuse non-finite or out-of-range flags and an unusable --out, before any model is loaded."""
    if not (math.isfinite(args.density) and 0.0 < args.density <= 1.0):
        raise BaselineArgError(f"--density: expected a finite number in (0, 1], got {args.density}")
    if not (math.isfinite(args.scale) and args.scale > 0.0):
        raise BaselineArgError(f"--scale: expected a finite number > 0, got {args.scale}")
    if not 1 <= args.preferences <= MAX_PREFERENCES:
        raise BaselineArgError(f"--preferences: expected an integer in [1, {MAX_PREFERENCES}], got {args.preferences}")
    if not 0 <= args.seed < 2**32:
        raise BaselineArgError(f"--seed: expected an integer in [0, 4294967296), got {args.seed}")
    if args.out:
        check_output_path(args.out, [args.zoo_dir], what="--out")
        if os.path.isdir(args.out):
            raise BaselineArgError(f"--out {args.out} is a directory; give the path of a JSON file")
        check_writable(args.out, "--out")  # its directory (or the nearest existing one) takes new files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hm3jax.search.baselines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir", help="directory written by python -m hm3jax.zoo")
    ap.add_argument("--preferences", type=int, default=10)
    ap.add_argument("--grid", action="store_true", help="Das-Dennis grid instead of Dirichlet draws")
    ap.add_argument("--density", type=float, default=0.7)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", choices=SCORER_OBJECTIVES, default="exact_match",
                    help="exact_match (HV reference point 0) or loglik: mean answer log-likelihood, "
                         "HV measured above the base model's scores")
    ap.add_argument("--out", help="write the scores as JSON here")
    add_verbosity_flags(ap)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:  # every value and the output checked before the minutes of scoring, not at the end
        check_args(args)
        t0 = time.perf_counter()
        cfg, models, tokenizer = load_zoo(args.zoo_dir)
    except (ValueError, OSError, RuntimeError, OverflowError) as e:  # ZooError is a RuntimeError
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    log.info(f"[baselines] loaded the zoo {args.zoo_dir} ({time.perf_counter() - t0:.1f}s)")
    suite = task_suite()
    names = [t.name for t in suite]
    missing = [n for n in [BASE, *names] if n not in models]
    if missing:
        print(f"error: {args.zoo_dir}: no checkpoint for {', '.join(missing)}", file=sys.stderr)
        return 2
    base, experts = models[BASE], [models[n] for n in names]
    score = jax.jit(make_scorer(cfg, make_suite_batch(suite, "heldout", tokenizer), len(names),
                                args.objective))
    prefs = preferences(len(names), args.preferences, args.seed, args.grid)
    key = jax.random.key(args.seed)
    # The centre preference rides along as a last row: one compiled merge-and-score per method.
    centre = np.full((1, len(names)), 1.0 / len(names))
    t0 = time.perf_counter()
    log.info(f"[baselines] merging and scoring {', '.join(UPPER_METHODS)} at {len(prefs) + 1} preferences "
             "(one compile per method)")
    scored = baseline_front(cfg, base, experts, score, np.concatenate([prefs, centre]), key,
                            density=args.density, scale=args.scale)
    fronts = {m: s[:-1] for m, s in scored.items()}
    log.info(f"[baselines] scored ({time.perf_counter() - t0:.1f}s)")
    rows = {BASE: np.asarray(score(base))}
    rows.update({f"{n} expert": np.asarray(score(e)) for n, e in zip(names, experts)})
    rows.update({m: s[-1] for m, s in scored.items()})
    exact = args.objective == "exact_match"
    ref = np.zeros(len(names)) if exact else rows[BASE]
    hv = {m: float(hypervolume(s[pareto_mask(s)], ref)) for m, s in fronts.items()}
    what = "teacher-forced exact match (%)" if exact else "mean answer log-likelihood"
    where = "reference point 0" if exact else "reference point = the base model's scores"
    print(f"held-out {what}, methods at λ = centre; front HV over {len(prefs)} preferences, {where}")
    print(format_table(names, rows, hv, percent=exact))
    if args.out:
        write_json_atomic(args.out, inputs=[args.zoo_dir], obj=round_floats({
            "tasks": names, "objective": args.objective, "reference": ref.tolist(),
            "preferences": prefs.tolist(), "rows": {k: v.tolist() for k, v in rows.items()},
            "fronts": {k: v.tolist() for k, v in fronts.items()}, "hypervolume": hv}))
    return 0


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
