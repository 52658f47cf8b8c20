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
from collections.abc import Sequence

from hm3jax.config import CONFIG_FILE, RunConfig, RunConfigError, parse_run_config, validate
from hm3jax.log import pop_verbosity_flags, setup_logging
from hm3jax.rundir import RunDirLock, check_run_dir, discard_new_run_dir, prepare_run_dir

log = logging.getLogger(__name__)


def run(cfg: RunConfig, stop_after: str | None = None) -> dict:
    """Run (or resume) every stage of a validated config whose run directory is prepared, and
    return the front.json document: hm3jax.run.driver.run (see there for `stop_after`)."""
    from hm3jax.run.driver import run as drive  # loads JAX: this module's import stays JAX-free

    return drive(cfg, stop_after)


def _check_outputs(cfg: RunConfig) -> None:
    """Before any run directory is made or anything trained: every place the run will write can be
    written (the run directory, and the zoo directory when the zoo is to be built there)."""
    from hm3jax.io.atomic import UnwritableOutputError, check_writable  # hm3jax.io loads JAX: see main

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
    import jax  # loaded by now (run_mesh); imported here to keep this module's import JAX-free

    return jax.process_index() == 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring). Exit status: 0 done; 2 a config, input or output error
    found before or during the run (one line on stderr; a new run leaves no directory behind); 1 the
    disk failed during the run (the run directory is kept, to be resumed); 3 stopped by
    HM3JAX_STOP_AFTER; 130 interrupted."""
    argv, verbose, quiet = pop_verbosity_flags(sys.argv[1:] if argv is None else argv)
    setup_logging(verbose, quiet)
    lock, existed, resumed, cfg = None, True, True, None
    try:
        try:
            cfg = parse_run_config(argv)  # no JAX yet: a typo'd key or a bad value is refused at once
            cfg = validate(cfg)
            # The run's machinery (JAX, the zoo, the stages) loads only once the config parsed: this
            # module's import stays JAX-free, so --help and a misspelt key answer at once.
            from hm3jax.io.atomic import NonFiniteValueError
            from hm3jax.run.context import check_zoo, run_mesh
            from hm3jax.run.stages import StopRun

            mesh = run_mesh(cfg)
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
        if mesh.devices.size > 1 or cfg.mesh.distributed:
            import jax  # loaded by now (run_mesh); imported here to keep this module's import JAX-free

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
        except StopRun as e:
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
