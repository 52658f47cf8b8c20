"""python -m hm3jax.merge CONFIG.yml OUT_DIR: run a mergekit YAML recipe out of core.

Also reachable as `python -m hm3jax.merging`. Exit status 0 on success, 2 on a usage or input error
(one-line message on stderr), 130 when interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM (one line
on stderr; the temporary output is removed and an existing OUT_DIR is unchanged), 1 on an
unexpected failure.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings


def interrupted_exit(signum: int, out_dir: str | None) -> int:
    """Print the one-line interruption message; the exit status (128 + signal number)."""
    where = f"; {out_dir} was not written or changed" if out_dir else ""
    print(f"interrupted by {signal.Signals(signum).name}{where}", file=sys.stderr)
    return 128 + signum


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hm3jax.merge",
        description="Merge models with a mergekit YAML recipe (same tensors as mergekit-yaml), "
                    "tensor by tensor from safetensors checkpoints.")
    p.add_argument("config", help="mergekit YAML recipe")
    p.add_argument("out_dir", help="output directory (HF model: config.json, safetensors, tokenizer); "
                                   "never an input, inside one or containing one")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--max-shard-size", default="5B",
                   help="bytes per output shard: an int, 5B/500M/100k (10^9/10^6/10^3, as mergekit) or "
                        "5GB/500MiB (default 5B)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of random methods (default 0)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="do not copy tokenizer files into out_dir")
    p.add_argument("--prefetch", type=int, default=2, help="tensors loaded ahead of the merge (default 2)")
    p.add_argument("--prefetch-bytes", default="512MiB",
                   help="cap on the input bytes loaded ahead, beyond the next tensor: an int or "
                        "512MiB/1GB (default 512MiB)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge and write tensors holding NaN/Inf with a warning (default: an error)")
    p.add_argument("--strict", action="store_true",
                   help="refuse recipe keys that mergekit ignores (parameters a method does not declare, "
                        "unknown keys) instead of warning about each")
    p.add_argument("--compute-dtype", choices=("mergekit", "float32"), default="mergekit",
                   help="arithmetic dtype: 'mergekit' (default) computes each method in the dtype mergekit "
                        "does, so float16/bfloat16 recipes give its tensors (ties, dare_*, task_arithmetic, "
                        "... in the recipe's dtype); 'float32' computes everything in float32 and rounds once")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    early: list[int] = []  # signals before hm3jax.io.interrupt is imported (JAX takes seconds)

    def early_handler(signum, frame):
        early.append(signum)
        if len(early) == 1:
            raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, early_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Imported here so `--help` answers without loading JAX.
        from hm3jax.io import interrupt
        from hm3jax.io.atomic import OutputExistsError, StaleTempWarning
        from hm3jax.merging.recipe import IgnoredKeyWarning
        from hm3jax.merging.stream import NonFiniteWarning, merge_recipe

        interrupt.install(already=early[0] if early else None)
        interrupt.check()
        with warnings.catch_warnings():
            warnings.simplefilter("always", NonFiniteWarning)
            warnings.simplefilter("always", StaleTempWarning)
            warnings.simplefilter("always", IgnoredKeyWarning)
            warnings.showwarning = _show_warning
            out = merge_recipe(args.config, args.out_dir, overwrite=args.overwrite,
                               max_shard_size=args.max_shard_size, seed=args.random_seed,
                               copy_tokenizer=args.copy_tokenizer, prefetch=max(0, args.prefetch),
                               prefetch_bytes=args.prefetch_bytes, progress=not args.quiet,
                               allow_nonfinite=args.allow_nonfinite, strict=args.strict,
                               compute_dtype=args.compute_dtype)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None) or (early[0] if early else signal.SIGINT)
        return interrupted_exit(signum, args.out_dir)
    except OutputExistsError as e:
        print(f"error: output {e.filename} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, OverflowError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except (RecursionError, MemoryError) as e:  # an input nested too deeply, or asking for too much memory
        print(f"error: {type(e).__name__}: an input is nested too deeply or too large to merge", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():  # main() may be called in-process (tests)
            signal.signal(sig, handler)
        if "hm3jax.io.interrupt" in sys.modules:
            sys.modules["hm3jax.io.interrupt"].reset()
    if not args.quiet:
        print(f"merged model written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
