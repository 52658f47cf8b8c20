"""`run(cfg)`: every stage of a run in order (each resumed from its checkpoint when saved), then the
Pareto front (front.json, front.png, report.md). hm3jax.train is its command line.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from hm3jax.config import RunConfig
from hm3jax.report import build_front, write_front
from hm3jax.report_text import fmt_hv, winner_sentence
from hm3jax.run import stages as st
from hm3jax.run.context import load_context, upper_methods
from hm3jax.run.record import UNSCORED
from hm3jax.run.solutions import identity_solutions, reference_records, solutions
from hm3jax.settings import BASE, MERGE

log = logging.getLogger(__name__)


def run(cfg: RunConfig, stop_after: str | None = None) -> dict:
    """Run (or resume) every stage of a validated config whose run directory is prepared.

    Args:
      stop_after: for tests of resuming: a stage name (stop once it is saved) or "lower:C" /
        "arch_only:C" / ... (stop after C chunks of that search); raises stages.StopRun.
    Returns:
      The front.json document.
    """
    start = time.perf_counter()
    ctx = load_context(cfg)
    ref = st.references(ctx, stop_after)
    ideal = ref["ideal"]
    up = st.upper(ctx, ideal, stop_after)
    merged = st.merged_models(ctx, up["density"], up["scale"], upper_methods(ctx, up))
    base_blocks = [ctx.base] * len(ctx.prefs)  # "no parameter level": the base in the merged block
    searches = {"lower": (st.lower_stage(ctx, "lower", merged, ideal, stop_after), merged)}
    if cfg.eval.baselines:
        searches["arch_only"] = (st.lower_stage(ctx, "arch_only", base_blocks, ideal, stop_after, blocks=BASE),
                                 base_blocks)
        searches["random_path"] = (st.baseline_search(ctx, "random_path", "random", merged, ideal,
                                                      stop_after), merged)
        searches["evolutionary_path"] = (st.baseline_search(ctx, "evolutionary_path", "evolution", merged,
                                                            ideal, stop_after), merged)
        params = st.param_baselines(ctx, stop_after)
    held = st.heldout_scores(ctx, searches, stop_after)
    generated = st.generated_scores(ctx, searches["lower"][0], merged, stop_after)

    hm3 = solutions(ctx, searches["lower"][0], held["lower"], MERGE, up)
    baselines = {}
    up_held = st.upper_heldout(ctx, merged)
    baselines["param_only"] = identity_solutions(ctx, up["search"], up_held, up, cfg.upper.method)
    if cfg.eval.baselines:
        baselines["arch_only"] = solutions(ctx, searches["arch_only"][0], held["arch_only"], BASE, None,
                                           with_upper=False)
        for name in ("random_path", "evolutionary_path"):
            baselines[name] = solutions(ctx, searches[name][0], held[name], MERGE, up)
        for method in ("task_arithmetic", "ties", "dare_ties"):
            baselines[method] = identity_solutions(ctx, params[f"{method}/search"], params[f"{method}/heldout"],
                                                   None, method)
    references = reference_records(ctx, ref)
    if generated is not None:  # the task scorers on generated answers (null where not generated)
        hm3 = [dataclasses.replace(sol, generated=UNSCORED if np.isnan(row).any() else row)
               for sol, row in zip(hm3, generated["hm3"], strict=True)]
        references = {name: dataclasses.replace(sol, generated=row)
                      for (name, sol), row in zip(references.items(), generated["references"], strict=True)}
    log.info("[front] started")
    t_front = time.perf_counter()
    front = build_front(ctx.tasks, [s.to_json() for s in hm3],  # the report reads front.json's records
                        {m: [s.to_json() for s in v] for m, v in baselines.items()},
                        {n: s.to_json() for n, s in references.items()}, cfg.front.cost_objective)
    write_front(cfg.output_dir, front)
    hv = ", ".join(f"{k} {fmt_hv(v)}" for k, v in front["hypervolume"].items())
    log.info(f"[front] hypervolume (held-out, normalised box): {hv} ({time.perf_counter() - t_front:.1f}s)")
    log.info(f"[front] {winner_sentence(front)}")
    step = cfg.lower.ppo.iterations  # the results of the whole search: logged at its last PPO iteration
    ctx.log({"stage": "heldout_scores", "step": step, "hm3": [list(s.heldout) for s in hm3],
             **{m: [list(s.heldout) for s in v] for m, v in baselines.items()},
             "references": {n: list(r.heldout) for n, r in references.items()}})
    ctx.log({"stage": "front", "step": step, "hypervolume": front["hypervolume"],
             "seconds": time.perf_counter() - start})
    return front
