"""python -m hm3jax.recommend RUN_DIR --preference a,b,c [--export DIR] [--search-iterations N]

Picks, from a finished run's front.json, the HM3 solution best for your preference λ: the one with
the lowest Tchebycheff value max_k λ_k |f_k - z*_k| on held-out scores, z* = front.json's "ideal"
(the best held-out score per task among the experts). Ties go to the first such solution.
The preference needs one non-negative weight per task (front.json's "tasks" order), not all zero;
weights that do not sum to 1 are normalised (divided by their sum), and the normalised vector is
printed.

Prints the chosen solution record as JSON on stdout (floats to 6 significant digits) and, on
stderr, a one-line summary and a table comparing it, under your λ, with the base, each expert and
each baseline method's best solution for λ (the lowest Tchebycheff value among its solutions): their
held-out scores and Tchebycheff values, and which of them beat the pick. `--export DIR`
also writes it as a Hugging Face checkpoint (see hm3jax.run.export): the source models are those of
RUN_DIR/config.yaml (the zoo or the checkpoints), and the upper-level merge, when the path uses it,
is rebuilt with `merge_for_preference(method, base, experts, preference, key, density, scale)` from
the solution's "upper" settings, key = `jax.random.key(upper["seed"])`, or the key whose raw data
`upper["key_data"]` holds when present (see merge_key).
`--search-iterations N` runs a short online search for this exact preference instead (see
hm3jax.run.online): the run's λ-conditioned agent (a run with `lower.ppo.mode: conditioned`) continues
PPO for N iterations on this λ over the upper-level merge for it, and its best path, scored on the
held-out split, is the answer (printed and exported as above; front.json is not changed); the
comparison then shows the front's pick and the online search's answer before and after.

Exit status: 0 on success, 2 on a usage or input error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from hm3jax.config import CONFIG_FILE, RunConfigError, ZooSource, check_numbers, load_run_config, task_names
from hm3jax.log import add_verbosity_flags, setup_logging
from hm3jax.report_text import best_for, label
from hm3jax.run.record import UpperSettings
from hm3jax.rundoc import RunDocError, check_front, check_solution, check_upper, read_json, round_floats, zoo_models
from hm3jax.settings import MERGE

log = logging.getLogger(__name__)

FRONT_FILE = "front.json"


class RecommendError(ValueError):
    """A preference, run directory or front that recommend cannot use."""


def parse_preference(text: str | Sequence[float], tasks: Sequence[str]) -> np.ndarray:
    """The preference as float64 [K] on the simplex.

    Accepts "a,b,c" or numbers; needs one finite, non-negative weight per task, not all zero.
    Weights not summing to 1 are normalised by their sum.
    """
    if isinstance(text, str):
        try:
            w = [float(x) for x in text.split(",")]
        except ValueError:
            raise RecommendError(f"--preference {text!r}: expected comma-separated numbers, one per task "
                                 f"({', '.join(tasks)})") from None
    else:
        w = [float(x) for x in text]
    if len(w) != len(tasks):
        raise RecommendError(f"--preference has {len(w)} weights but the run has {len(tasks)} tasks "
                             f"({', '.join(tasks)})")
    if not all(math.isfinite(x) for x in w) or any(x < 0 for x in w):
        raise RecommendError(f"--preference {w}: weights must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise RecommendError("--preference: the weights are all zero; give at least one positive weight")
    return np.asarray(w, np.float64) / total


def read_front(run_dir: str | os.PathLike) -> dict:
    """front.json of a run directory, checked as untrusted input (hm3jax.rundoc.check_front: tasks,
    ideal and every solution record); RecommendError naming the file and field otherwise."""
    path = os.path.join(os.fspath(run_dir), FRONT_FILE)
    if not os.path.lexists(path):
        raise RecommendError(f"{path}: no such file (is {os.fspath(run_dir)} a finished hm3jax run?)")
    try:
        return check_front(read_json(path, "front.json document"), path)
    except RunDocError as e:
        raise RecommendError(str(e)) from None


def pick_solution(front: Mapping, preference: Sequence[float]) -> tuple[int, dict, float]:
    """(index, record, Tchebycheff value) of the HM3 solution minimising max_k λ_k |f_k - z*_k|.

    f = held-out scores, z* = front["ideal"], λ = `preference` (already on the simplex).
    """
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    import jax.numpy as jnp

    from hm3jax.moo import tchebycheff
    from hm3jax.report import heldout

    k = len(front["tasks"])
    scores = heldout(front["solutions"], k, "solutions")
    lam = np.asarray(preference, np.float64)
    values = np.asarray(tchebycheff(jnp.asarray(scores), jnp.asarray(lam), jnp.asarray(front["ideal"])),
                        np.float64)
    i = int(np.argmin(values))
    return i, front["solutions"][i], float(values[i])


def tchebycheff_value(solution: Mapping, preference: Sequence[float], front: Mapping) -> float:
    """max_k λ_k |f_k - z*_k| of one solution record's held-out scores, z* = front["ideal"]."""
    f = np.asarray(solution["scores"]["heldout"], np.float64)
    return float(np.max(np.asarray(preference, np.float64) * np.abs(f - np.asarray(front["ideal"], np.float64))))


def comparison(front: Mapping, preference: Sequence[float], picks: Mapping[str, Mapping]) -> list[tuple]:
    """(label, held-out scores, Tchebycheff value under `preference`) of each of `picks` ({label:
    solution}), the base, each expert and each baseline method's best solution for the preference
    (lowest Tchebycheff value among its solutions). Malformed records are a ValueError naming them."""
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    from hm3jax.report import heldout
    k, ideal = len(front["tasks"]), front["ideal"]
    rows = [(name, list(s["scores"]["heldout"]), tchebycheff_value(s, preference, front)) for name, s in picks.items()]
    refs = front.get("references") or {}
    if not isinstance(refs, Mapping):
        raise RecommendError("front.json: references: expected a mapping of model name -> record")
    for name in ["base", *front["tasks"]]:
        if name in refs:
            f = heldout([refs[name]], k, f"front.json: references.{name}")[0].tolist()
            rows.append(("base" if name == "base" else f"expert {name}", f,
                         tchebycheff_value({"scores": {"heldout": f}}, preference, front)))
    baselines = front.get("baselines") or {}
    if not isinstance(baselines, Mapping):
        raise RecommendError("front.json: baselines: expected a mapping of method -> records")
    for m, group in baselines.items():
        if not isinstance(group, list) or not group:
            continue
        scores = heldout(group, k, f"front.json: baselines.{m}")
        i, value = best_for([{"scores": {"heldout": r.tolist()}} for r in scores], preference, ideal,
                            searched_first=False)
        rows.append((f"{label(m)} (best of {len(group)})", scores[i].tolist(), value))
    return rows


def comparison_text(front: Mapping, rows: Sequence[tuple], first: int = 1) -> str:
    """The comparison as a small fixed-width table, then which rows beat the first `first` (the picks)."""
    tasks = front["tasks"]
    width = max(len(r[0]) for r in rows) + 2
    head = "".join(f"{t[:11]:>12}" for t in tasks) + f"{'Tchebycheff':>13}"
    lines = [f"{'':<{width}}{head}"]
    for name, f, value in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{x:>12.4f}" for x in f) + f"{value:>13.4f}")
    ours = min(r[2] for r in rows[:first])
    better = [f"{r[0]} ({r[2]:.4f})" for r in rows[first:] if r[2] < ours]
    lines.append(f"lower Tchebycheff value is better; beating the pick ({ours:.4f}): "
                 + (", ".join(better) if better else "none"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ export
def source_checkpoints(run_dir: str | os.PathLike) -> tuple[object, dict[str, str]]:
    """(RunConfig of RUN_DIR/config.yaml, {"base" | task name: checkpoint directory})."""
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    from hm3jax.io.paths import NotRegularFileError, check_regular
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if not os.path.lexists(path):
        raise RecommendError(f"{path}: no such file; --export needs the run's config to find its models")
    try:
        check_regular(path, "config file")
        cfg = load_run_config(path)
        check_numbers(cfg)  # the run's own config is read back as untrusted too
    except NotRegularFileError as e:
        raise RecommendError(str(e)) from None
    except RunConfigError as e:
        raise RecommendError(f"{path}: {e}" if path not in str(e) else str(e)) from None
    if cfg.models.checkpoints is not None:
        ck = cfg.models.checkpoints
        for key, p in [("base", ck.base), *((f"experts.{n}", p) for n, p in ck.experts.items())]:
            if not isinstance(p, str) or not p:
                raise RecommendError(f"{path}: models.checkpoints.{key}: expected a checkpoint directory, got {p!r}")
        return cfg, {"base": ck.base, **ck.experts}
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    from hm3jax.zoo import CONFIGS, ZooError, check_zoo_dir

    zoo = cfg.models.zoo or ZooSource()
    if zoo.config not in CONFIGS:
        raise RecommendError(f"{path}: models.zoo.config {zoo.config!r} is not one of {sorted(CONFIGS)}")
    manifest_file = os.path.join(zoo.dir, "zoo.json")
    try:
        if os.path.lexists(manifest_file):
            check_regular(manifest_file, "zoo manifest")  # a FIFO would block check_zoo_dir's open()
        # The zoo must still be the one the run used (same zoo config and seed), not a rebuilt one.
        manifest = check_zoo_dir(zoo.dir, CONFIGS[zoo.config], zoo.seed)
    except (ZooError, NotRegularFileError) as e:
        raise RecommendError(f"{path}: models.zoo.dir: {e}") from None
    if manifest is None:
        raise RecommendError(f"{path}: models.zoo.dir {zoo.dir} holds no zoo (no zoo.json); run recommend "
                             "from the directory the run was started in, or rebuild the zoo")
    try:
        return cfg, zoo_models(zoo.dir, manifest, ["base", *task_names(cfg)])
    except RunDocError as e:
        raise RecommendError(f"{path}: models.zoo.dir: {e}") from None


def merge_key(upper: Mapping):
    """The PRNG key the upper-level merge used: `jax.random.wrap_key_data(upper["key_data"])` when the
    record carries the key's raw data (e.g. the merge key `run_upper` split off its key), else
    `jax.random.key(upper["seed"])`."""
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    import jax

    try:
        settings = UpperSettings.from_json(check_upper(upper, "solution's upper"))
    except RunDocError as e:
        raise RecommendError(str(e)) from None
    if settings.key_data is not None:
        return jax.random.wrap_key_data(np.asarray(settings.key_data, np.uint32))
    if settings.seed is None:
        raise RecommendError("solution's 'upper' has neither 'seed' nor 'key_data': the merge's random "
                             "key cannot be rebuilt")
    return jax.random.key(settings.seed)


def export_solution(run_dir: str | os.PathLike, solution: Mapping, out_dir: str | os.PathLike,
                    overwrite: bool = False) -> str:
    """Write `solution` (a record of RUN_DIR's front) as an HF checkpoint with recipes (hm3jax.run.export)."""
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    import jax

    from hm3jax.io import load_pretrained
    from hm3jax.io.atomic import UnwritableOutputError, check_output_path, check_writable
    from hm3jax.run.export import export_path
    if isinstance(solution, dict) and solution.get("aligned") is True:  # refused before anything is read
        raise RecommendError("this solution's scores were measured with alignment maps at model switches "
                             "(lower.align.enabled), which a transformers checkpoint cannot hold; export a "
                             "solution of a run without alignment")
    cfg, ckpts = source_checkpoints(run_dir)
    tasks = list(task_names(cfg))
    try:
        solution = check_solution(solution, len(tasks), "solution")
    except RunDocError as e:
        raise RecommendError(str(e)) from None
    check_output_path(out_dir, [run_dir, *ckpts.values()])  # before loading anything
    try:
        check_writable(out_dir, "--export")
    except UnwritableOutputError as e:
        raise RecommendError(str(e)) from None
    steps = [s for s in solution["path"] if s is not None]
    needed = {s[0] for s in steps} | {solution["shell"]}
    uses_merge = MERGE in needed
    if uses_merge:
        needed |= {"base", *tasks}
    unknown = sorted(needed - set(ckpts) - {MERGE})
    if unknown:
        raise RecommendError(f"solution names model(s) {', '.join(unknown)}, not among the run's models "
                             f"({', '.join(ckpts)})")
    models, model_cfg = {}, None
    for name in sorted(needed - {MERGE}):
        model_cfg, models[name] = load_pretrained(ckpts[name], dtype=cfg.models.dtype)
    if uses_merge:
        # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
        from hm3jax.search.upper import merge_for_preference

        up = solution.get("upper") or {}
        if "method" not in up:
            raise RecommendError("solution's 'upper' needs 'method' (and 'seed' or 'key_data') to rebuild its merge")
        settings = UpperSettings.from_json(up)
        merge = jax.jit(merge_for_preference, static_argnums=0)  # one compile, not one per op
        models[MERGE] = merge(
            settings.method, models["base"], [models[t] for t in tasks],
            np.asarray(solution["preference"], np.float32), merge_key(up),
            1.0 if settings.density is None else settings.density, 1.0 if settings.scale is None else settings.scale)
    return export_path(out_dir, model_cfg, models, steps, solution["shell"], solution=solution,
                       checkpoints=ckpts, experts=tasks, overwrite=overwrite)


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hm3jax.recommend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run directory (front.json, config.yaml)")
    p.add_argument("--preference", required=True,
                   help="comma-separated weights, one per task in front.json's order, >= 0 "
                        "(normalised to sum to 1)")
    p.add_argument("--export", metavar="DIR", help="write the chosen model here as an HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the --export directory if it exists")
    p.add_argument("--search-iterations", type=int, default=0, metavar="N",
                   help="instead of picking from the front, continue the run's λ-conditioned agent "
                        "(lower.ppo.mode: conditioned) for N PPO iterations on this preference")
    add_verbosity_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
    from hm3jax.io.atomic import OutputExistsError, UnsafeOutputError
    try:
        front = read_front(args.run_dir)
        lam = parse_preference(args.preference, front["tasks"])
        if args.search_iterations < 0:
            raise RecommendError(f"--search-iterations must be >= 0, got {args.search_iterations}")
        if args.search_iterations:
            # JAX (and what loads it) only for the commands that need it: a plain pick reads JSON
            from hm3jax.run.online import OnlineSearchError, check_run, search_preference

            try:
                check_run(args.run_dir)
            except OnlineSearchError as e:
                raise RecommendError(f"--search-iterations: {e}") from None
        if args.search_iterations:
            source_checkpoints(args.run_dir)  # the run's models must exist: never build a zoo here
        i, sol, value = pick_solution(front, lam)
        picks = {f"pick (solution {i})": sol}
        print(f"preference {[round(float(x), 4) for x in lam]} over {', '.join(front['tasks'])}: solution "
              f"{i} of {len(front['solutions'])}, held-out {sol['scores']['heldout']}, Tchebycheff "
              f"{value:.4f}, {len([s for s in sol['path'] if s is not None])} layers", file=sys.stderr)
        if args.search_iterations:
            try:  # a NaN score of the new search is an error, never printed or exported
                sol = check_solution(search_preference(args.run_dir, lam, args.search_iterations).to_json(),
                                     len(front["tasks"]), "the online search's solution")
            except RunDocError as e:
                raise RecommendError(str(e)) from None
            before, value = value, tchebycheff_value(sol, lam, front)
            print(f"online search ({args.search_iterations} iterations of the run's conditioned agent): "
                  f"held-out {sol['scores']['heldout']}, Tchebycheff {value:.4f}, "
                  f"{len([s for s in sol['path'] if s is not None])} layers; before/after vs the front's pick: "
                  f"Tchebycheff {before:.4f} -> {value:.4f} "
                  f"({'better' if value < before else 'worse' if value > before else 'the same'})",
                  file=sys.stderr)
            picks = {f"front's pick (solution {i})": picks[f"pick (solution {i})"], "online search": sol}
        print(comparison_text(front, comparison(front, lam, picks), first=len(picks)), file=sys.stderr)
        print(json.dumps(round_floats(sol), indent=2, allow_nan=False))
        if args.export:
            out = export_solution(args.run_dir, sol, args.export, overwrite=args.overwrite)
            log.info(f"exported to {out}")
    except OutputExistsError as e:
        print(f"error: output {e.filename} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except (RecommendError, UnsafeOutputError, ValueError, OSError, OverflowError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: an input is nested too deeply to be read (RecursionError)", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (MemoryError) reading the run's inputs", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
