"""python -m hm3jax.zoo OUT_DIR [--config default|small] [--seed N] [--force] [--workers N]"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from hm3jax.io.atomic import UnwritableOutputError, check_writable
from hm3jax.io.paths import NotRegularFileError, check_regular
from hm3jax.log import add_verbosity_flags, setup_logging
from hm3jax.zoo.build import ZooError, build_zoo, check_zoo_dir
from hm3jax.zoo.config import CONFIGS
from hm3jax.zoo.probe import format_report

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None, prog: str = "python -m hm3jax.zoo") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Build (or reuse) the embedded model zoo: a base pretrained on the "
        "task mixture and one gently fine-tuned expert per task, saved as HF checkpoints, with a "
        "report of how well they merge.")
    ap.add_argument("out_dir", help="directory for base/, one directory per task expert and zoo.json "
                    "(must be missing, empty, or a zoo this command wrote)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default", help="hyperparameter set")
    ap.add_argument("--seed", type=int, default=0, help="seed of init and batch sampling")
    ap.add_argument("--force", action="store_true",
                    help="rebuild a zoo of another config or seed, or one with a corrupt manifest "
                         "(replaces only what a zoo build writes)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for the expert runs (default: one per core; 0: in this process)")
    add_verbosity_flags(ap)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        if not 0 <= args.seed < 2**32:
            raise ZooError(f"--seed must be in [0, 2**32), got {args.seed}")
        if args.workers is not None and not 0 <= args.workers < 2**10:
            raise ZooError(f"--workers must be >= 0 (0: in this process), got {args.workers}")
        manifest_file = os.path.join(args.out_dir, "zoo.json")
        if os.path.lexists(manifest_file) and os.path.exists(manifest_file):
            check_regular(manifest_file, "zoo manifest")  # a FIFO would block reading it
        # Before minutes of training: a zoo that will be built must have somewhere to go.
        if args.force or check_zoo_dir(args.out_dir, CONFIGS[args.config], args.seed) is None:
            check_writable(args.out_dir, "OUT_DIR")
        t0 = time.perf_counter()
        log.info(f"[zoo] {args.out_dir}: config {args.config}, seed {args.seed} (reused if already built)")
        manifest = build_zoo(args.out_dir, CONFIGS[args.config], seed=args.seed, force=args.force,
                             workers=args.workers, progress=not args.quiet)
        log.info(f"[zoo] done ({time.perf_counter() - t0:.1f}s)")
    except (ZooError, UnwritableOutputError, NotRegularFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out_dir}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was replaced (the zoo directory has no zoo.json until a build "
              "completes)", file=sys.stderr)
        return 130
    print(format_report(manifest))
    print(f"build time {manifest['build_seconds']:.1f}s (as recorded when built); "
          f"targets {'met' if manifest['targets_met'] else 'NOT met'}")
    return 0
