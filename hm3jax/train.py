"""python -m hm3jax.train [--config_path configs/X.yaml] [--output_dir DIR] [--dotted.key value ...]

HM3 end to end: load the models (or build/reuse the embedded zoo) -> score the base and the experts
(ideal point) -> preferences -> upper level (parameter merges) -> lower level (PPO over layer paths)
-> baselines -> held-out evaluation -> the Pareto front (front.json, front.png, report.md). With no
arguments it runs configs/default.yaml's settings (the embedded zoo on CPU). The run directory is
resumable: the same command after an interruption continues where the run stopped.

-v/--verbose shows debug messages with time stamps; -q/--quiet only warnings and errors. A config
error (an unknown key, a bad value) is one line on stderr and exit status 2, before JAX is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence

from hm3jax.config import (
    CONFIG_FILE,
    RunConfig,
    RunConfigError,
    parse_run_config,
    preference_matrix,
    task_names,
    validate,
)
from hm3jax.log import pop_verbosity_flags, setup_logging
from hm3jax.rundir import discard_new_run_dir, prepare_run_dir
from hm3jax.settings import BASE, MERGE

log = logging.getLogger(__name__)


def load_context(cfg: RunConfig):
    """The stages' Context: models, tokenizer, batches, preferences, the stage store and the log."""
    from hm3jax import pipeline as pl
    from hm3jax.io import load_tokenizer

    tasks = task_names(cfg)
    if cfg.models.zoo is not None:
        from hm3jax.zoo import CONFIGS, ZooError, build_zoo, load_zoo

        zc = CONFIGS[cfg.models.zoo.config]
        try:
            build_zoo(cfg.models.zoo.dir, zc, seed=cfg.models.zoo.seed, progress=cfg.log.progress)
            model_cfg, models, tokenizer = load_zoo(cfg.models.zoo.dir)
        except ZooError as e:
            raise RunConfigError(_zoo_problem(cfg, e)) from None
        suite = zc.suite()
    else:
        from hm3jax.objectives.synthetic import tasks as embedded_suite

        ck = cfg.models.checkpoints
        load = _loader(cfg)
        model_cfg, base = load(ck.base)
        models = {BASE: base}
        for name, path in ck.experts.items():
            c, models[name] = load(path)
            if c.layer_signature != model_cfg.layer_signature or c.num_hidden_layers != model_cfg.num_hidden_layers:
                raise RunConfigError(f"models.checkpoints.experts.{name}: {path} has another layer layout "
                                     "or depth than the base")
        tokenizer = load_tokenizer(ck.base)
        suite = embedded_suite()
    if cfg.tasks.kind == "files":
        from hm3jax.objectives.taskfiles import FileTask

        suite = tuple(FileTask(t, cfg.tasks.files[t].search, cfg.tasks.files[t].heldout, cfg.tasks.files[t].scorer)
                      for t in tasks)
    pl.check_models(tasks, models)
    search, heldout = pl.load_batches(suite, tokenizer)
    if cfg.tasks.kind == "files":
        _check_lengths(cfg, model_cfg, suite, tokenizer, max(search.tokens.shape[1], heldout.tokens.shape[1]))
    mesh = _search_mesh(cfg)
    if mesh is not None:  # every model FSDP-sharded (if not loaded so): the merges and scorers follow
        import jax

        from hm3jax.sharding import param_shardings

        models = {k: jax.device_put(v, param_shardings(v, mesh, cfg.mesh)) for k, v in models.items()}
    return pl.Context(cfg, model_cfg, tasks, models[BASE], [models[t] for t in tasks], tokenizer,
                      search, heldout, preference_matrix(cfg), pl.StageStore(cfg.output_dir),
                      pl.metrics_logger(cfg.output_dir, cfg.log.tensorboard), {}, mesh, tuple(suite))


def _zoo_problem(cfg: RunConfig, e: Exception) -> str:
    """The error for a models.zoo.dir that cannot be used, with the command that rebuilds it."""
    z = cfg.models.zoo
    return (f"models.zoo.dir: {e}. To rebuild it for this run: python -m hm3jax.zoo {z.dir} --config "
            f"{z.config} --seed {z.seed} --force")


def check_zoo(cfg: RunConfig) -> None:
    """Before any run directory is made: the zoo directory must be missing, empty, or a complete zoo
    of the run's zoo config and seed (what build_zoo reuses). Raises RunConfigError otherwise."""
    if cfg.models.zoo is None:
        return
    from hm3jax.zoo import CONFIGS, ZooError, check_zoo_dir

    try:
        check_zoo_dir(cfg.models.zoo.dir, CONFIGS[cfg.models.zoo.config], cfg.models.zoo.seed)
    except ZooError as e:
        raise RunConfigError(_zoo_problem(cfg, e)) from None


def _check_lengths(cfg: RunConfig, model_cfg, suite, tokenizer, scored_len: int) -> None:
    """Task files whose rows the model cannot hold are a config error before any search: the longest
    prompt + answer, and the longest graded prompt + tasks.max_new_tokens."""
    limit = model_cfg.max_position_embeddings
    if scored_len > limit:
        raise RunConfigError(f"tasks.files: the longest prompt + answer takes {scored_len} tokens (padded), "
                             f"more than the model's max_position_embeddings {limit}")
    from hm3jax.objectives.batch import special_ids
    from hm3jax.objectives.taskfiles import graded_prompts

    rows, pad = cfg.tasks.generate_rows, special_ids(tokenizer)[1]
    for task in suite if rows else ():
        need = graded_prompts(task, tokenizer, rows, pad)[1].shape[1] + cfg.tasks.max_new_tokens
        if need > limit:
            raise RunConfigError(f"tasks.max_new_tokens {cfg.tasks.max_new_tokens}: the longest graded prompt of "
                                 f"tasks.files.{task.name}.heldout plus the answer takes {need} positions, "
                                 f"more than the model's max_position_embeddings {limit}")


def run(cfg: RunConfig, stop_after: str | None = None) -> dict:
    """Run (or resume) every stage of a validated config whose run directory is prepared.

    Args:
      stop_after: for tests of resuming: a stage name (stop once it is saved) or "lower:C" /
        "arch_only:C" / ... (stop after C chunks of that search); raises pipeline.StopRun.
    Returns:
      The front.json document.
    """
    import numpy as np

    from hm3jax import pipeline as pl
    from hm3jax.report import build_front, make_solution, write_front

    start = time.perf_counter()
    ctx = load_context(cfg)
    ref = pl.references(ctx, stop_after)
    ideal = ref["ideal"]
    up = pl.upper(ctx, ideal, stop_after)
    merged = pl.merged_models(ctx, up["density"], up["scale"], pl.upper_methods(ctx, up))
    base_blocks = [ctx.base] * len(ctx.prefs)  # "no parameter level": the base in the merged block
    searches = {"lower": (pl.lower_stage(ctx, "lower", merged, ideal, stop_after), merged)}
    if cfg.eval.baselines:
        searches["arch_only"] = (pl.lower_stage(ctx, "arch_only", base_blocks, ideal, stop_after, blocks=BASE),
                                 base_blocks)
        searches["random_path"] = (pl.baseline_search(ctx, "random_path", "random", merged, ideal,
                                                      stop_after), merged)
        searches["evolutionary_path"] = (pl.baseline_search(ctx, "evolutionary_path", "evolution", merged,
                                                            ideal, stop_after), merged)
        params = pl.param_baselines(ctx, stop_after)
    held = pl.heldout_scores(ctx, searches, ideal, stop_after)
    generated = pl.generated_scores(ctx, searches["lower"][0], merged, stop_after)

    hm3 = pl.solutions(ctx, searches["lower"][0], held["lower"], MERGE, up, make_solution)
    baselines = {}
    up_held = pl.upper_heldout(ctx, merged)
    baselines["param_only"] = pl.identity_solutions(ctx, up["search"], up_held, up, cfg.upper.method,
                                                    make_solution)
    if cfg.eval.baselines:
        baselines["arch_only"] = pl.solutions(ctx, searches["arch_only"][0], held["arch_only"], BASE,
                                              None, make_solution, with_upper=False)
        for name in ("random_path", "evolutionary_path"):
            baselines[name] = pl.solutions(ctx, searches[name][0], held[name], MERGE, up, make_solution)
        for method in ("task_arithmetic", "ties", "dare_ties"):
            baselines[method] = pl.identity_solutions(ctx, params[f"{method}/search"], params[f"{method}/heldout"],
                                                      None, method, make_solution)
    references = pl.reference_records(ctx, ref, make_solution)
    if generated is not None:  # the task scorers on generated answers (null where not generated)
        for sol, row in zip(hm3, generated["hm3"]):
            sol["scores"]["generated"] = None if np.isnan(row).any() else [float(x) for x in row]
        for sol, row in zip(references.values(), generated["references"]):
            sol["scores"]["generated"] = [float(x) for x in row]
    log.info("[front] started")
    t_front = time.perf_counter()
    front = build_front(ctx.tasks, hm3, baselines, references, cfg.front.cost_objective)
    write_front(cfg.output_dir, front)
    from hm3jax.report_text import fmt_hv, winner_sentence

    hv = ", ".join(f"{k} {fmt_hv(v)}" for k, v in front["hypervolume"].items())
    log.info(f"[front] hypervolume (held-out, normalised box): {hv} ({time.perf_counter() - t_front:.1f}s)")
    log.info(f"[front] {winner_sentence(front)}")
    step = cfg.lower.ppo.iterations  # the results of the whole search: logged at its last PPO iteration
    ctx.log({"stage": "heldout_scores", "step": step, "hm3": [s["scores"]["heldout"] for s in hm3],
             **{m: [s["scores"]["heldout"] for s in v] for m, v in baselines.items()},
             "references": {n: r["scores"]["heldout"] for n, r in references.items()}})
    ctx.log({"stage": "front", "step": step, "hypervolume": front["hypervolume"],
             "seconds": time.perf_counter() - start})
    return front


def _mesh(cfg: RunConfig):
    """The run's device mesh (jax.distributed.initialize() first when `mesh.distributed`), built
    before any work so a mesh that does not fit the devices is reported as a config error."""
    from hm3jax.sharding import ShardingError, make_mesh

    try:
        return make_mesh(cfg.mesh)
    except ShardingError as e:
        raise RunConfigError(str(e)) from None


def _loader(cfg: RunConfig):
    """path -> (ModelConfig, params): on a mesh of several devices, safetensors checkpoints are read
    straight into shards (io.sharded.load_sharded: each device reads its slice); else load_pretrained."""
    from hm3jax.io import load_pretrained
    from hm3jax.io.hf import has_safetensors
    from hm3jax.io.sharded import load_sharded

    mesh = _search_mesh(cfg)

    def load(path: str):
        if mesh is not None and os.path.isdir(path) and has_safetensors(path):
            return load_sharded(path, mesh, dtype=cfg.models.dtype, mesh_cfg=cfg.mesh)
        return load_pretrained(path, dtype=cfg.models.dtype)

    return load


def _search_mesh(cfg: RunConfig):
    """The mesh the searches run on: None on one device (the default: nothing is moved)."""
    mesh = _mesh(cfg)
    return mesh if mesh.devices.size > 1 else None


def _check_outputs(cfg: RunConfig) -> None:
    """Before any run directory is made or anything trained: every place the run will write can be
    written (the run directory, and the zoo directory when the zoo is to be built there)."""
    from hm3jax.io.atomic import UnwritableOutputError, check_writable

    try:
        check_writable(cfg.output_dir, "output_dir")
        z = cfg.models.zoo
        if z is not None and not os.path.isfile(os.path.join(z.dir, "zoo.json")):
            check_writable(z.dir, "models.zoo.dir (the zoo is built there)")
    except UnwritableOutputError as e:
        raise RunConfigError(str(e)) from None


def _leads(cfg: RunConfig) -> bool:
    """Whether this process keeps the run directory's lock: every process of a multi-host run shares
    one directory, and process 0 speaks for them."""
    if not cfg.mesh.distributed:
        return True
    import jax

    return jax.process_index() == 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring). Exit status: 0 done; 2 a config, input or output error
    found before or during the run (one line on stderr; a new run leaves no directory behind); 1 the
    disk failed during the run (the run directory is kept, to be resumed); 3 stopped by
    HM3JAX_STOP_AFTER; 130 interrupted."""
    from hm3jax.rundir import RunDirLock, check_run_dir

    argv, verbose, quiet = pop_verbosity_flags(sys.argv[1:] if argv is None else argv)
    setup_logging(verbose, quiet)
    lock, existed, resumed, cfg = None, True, True, None
    try:
        try:
            cfg = parse_run_config(argv)  # no JAX yet: a typo'd key or a bad value is refused at once
            cfg = validate(cfg)
            mesh = _mesh(cfg)
            check_zoo(cfg)
            _check_outputs(cfg)
            existed = os.path.lexists(cfg.output_dir)
            had_config = os.path.lexists(os.path.join(cfg.output_dir, CONFIG_FILE))
            check_run_dir(cfg)  # read-only: refuse a foreign directory before creating or locking anything
            if _leads(cfg):
                lock = RunDirLock(cfg.output_dir).acquire()
            resumed = prepare_run_dir(cfg)
        except (RunConfigError, OverflowError, RecursionError, MemoryError) as e:
            if lock is not None and not had_config:  # undo the directory and lock of a new run
                discard_new_run_dir(cfg, existed)
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        from hm3jax import pipeline as pl
        from hm3jax.io.atomic import NonFiniteValueError

        if mesh.devices.size > 1 or cfg.mesh.distributed:
            import jax

            log.info(f"mesh {dict(mesh.shape)} on {mesh.devices.size} of {jax.device_count()} devices, "
                     f"process {jax.process_index() + 1} of {jax.process_count()}")
        log.info(f"{'resuming' if resumed else 'starting'} run in {cfg.output_dir}")
        try:
            # HM3JAX_STOP_AFTER (a stage name, or "lower:C"): stop there, as a kill would (tests of resuming)
            front = run(cfg, stop_after=os.environ.get("HM3JAX_STOP_AFTER") or None)
        except (RunConfigError, NonFiniteValueError, OverflowError, RecursionError, MemoryError) as e:
            if not resumed:
                discard_new_run_dir(cfg, existed)
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        except pl.StopRun as e:
            print(f"stopped after {e}", file=sys.stderr)
            return 3
        except OSError as e:  # a full disk, a directory removed under the run: keep what is saved
            print(f"error: {_one_line(e)}; the run directory {cfg.output_dir} keeps every finished stage, "
                  "run the same command again to resume", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"interrupted; run the same command again to resume from {cfg.output_dir}/checkpoints",
                  file=sys.stderr)
            return 130
    finally:
        if lock is not None:
            lock.release()
    print(f"front: {cfg.output_dir}/front.json, report: {cfg.output_dir}/report.md "
          f"({len(front['solutions'])} HM3 solutions)")
    return 0


def _one_line(e: BaseException) -> str:
    """An exception as one line (the message's first line; the type when it has none)."""
    if isinstance(e, RecursionError):
        return "input nested too deeply to be read (RecursionError)"
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError): an input or config value asks for more memory than there is"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
