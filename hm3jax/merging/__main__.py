"""python -m hm3jax.merge CONFIG.yml OUT_DIR: run a mergekit YAML recipe out of core.

A drop-in for `mergekit-yaml`: every option of mergekit 0.1.5's command is accepted, so a tutorial's
command line runs unchanged. Those with a meaning here act (`--out-shard-size` is `--max-shard-size`,
`--copy-tokenizer/--no-copy-tokenizer`, `--write-model-card/--no-write-model-card`, `--random-seed`,
`--quiet`, `-v`); the others (devices, LoRA caches, unpickling, ...) have no effect and each prints
a one-line `note:` on stderr saying why. Every output has a model card (README.md with Hugging Face
front matter) unless `--no-write-model-card`, and `transformers_version` in its config.json.

Also reachable as `python -m hm3jax.merging`. Exit status 0 on success, 2 on a usage or input error
(one-line message on stderr), 130 when interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM (one line
on stderr; the temporary output is removed and an existing OUT_DIR is unchanged), 1 on an
unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings

from hm3jax.io import interrupt
from hm3jax.io.atomic import OutputExistsError, StaleTempWarning
from hm3jax.log import setup_logging
from hm3jax.merging.finite import NonFiniteWarning
from hm3jax.merging.recipe import IgnoredKeyWarning
from hm3jax.merging.stream import RandomMasksNotice, merge_recipe

# mergekit-yaml's options (mergekit 0.1.5, mergekit/options.py) that have no effect here, and why.
# Booleans come as --x / --no-x, as in mergekit; the rest take a value.
MERGEKIT_NO_EFFECT_FLAGS = {
    "allow-crimes": "models of different architectures are refused (tensors are merged by name)",
    "unsafe-truncate-embeddings": "embedding rows are never truncated; use tokenizer_source for vocabularies",
    "cuda": "JAX picks the device (set JAX_PLATFORMS)",
    "low-cpu-memory": "the merge streams tensor by tensor anyway",
    "clone-tensors": "every tensor is written on its own anyway",
    "trust-remote-code": "no model code is ever run",
    "lazy-unpickle": "inputs are read from safetensors tensor by tensor anyway",
    "read-to-gpu": "JAX picks the device (set JAX_PLATFORMS)",
    "multi-gpu": "JAX picks the device (set JAX_PLATFORMS)",
    "async-write": "a writer thread writes while the next tensor merges anyway",
}
MERGEKIT_NO_EFFECT_VALUES = {
    "transformers-cache": "Hub ids are not downloaded; inputs are local directories",
    "lora-merge-cache": "LoRA references are not supported",
    "lora-merge-dtype": "LoRA references are not supported",
    "device": "JAX picks the device (set JAX_PLATFORMS)",
    "num-threads": "XLA sizes its own thread pool",
    "write-threads": "one writer thread writes the shards",
}


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
    p.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size", default="5B",
                   help="bytes per output shard: an int, 5B/500M/100k (10^9/10^6/10^3, as mergekit) or "
                        "5GB/500MiB (default 5B); --out-shard-size is mergekit's name")
    p.add_argument("--random-seed", type=int, default=0, help="seed of random methods (default 0)")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer files into out_dir (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="do not copy tokenizer files into out_dir")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True,
                   help="write README.md, a model card with Hugging Face front matter (default)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false",
                   help="no README.md model card")
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; only warnings and errors")
    p.add_argument("--no-quiet", dest="quiet", action="store_false", help="show the progress bar (default)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="print each tensor's load / merge / write times on stderr instead of the progress bar "
                        "(each merge is then waited for before the next starts, so the times are exact)")
    g = p.add_argument_group("mergekit-yaml options without effect here (accepted with a note)")
    for name, why in MERGEKIT_NO_EFFECT_FLAGS.items():
        dest = "mk_" + name.replace("-", "_")
        g.add_argument(f"--{name}", dest=dest, action="store_const", const=f"--{name}", help=why)
        g.add_argument(f"--no-{name}", dest=dest, action="store_const", const=f"--no-{name}",
                       help=argparse.SUPPRESS)
    g.add_argument("--gpu-rich", dest="mk_gpu_rich", action="store_const", const="--gpu-rich",
                   help="JAX picks the device (set JAX_PLATFORMS)")
    g.add_argument("--safe-serialization", dest="mk_safe_serialization", action="store_const",
                   const="--safe-serialization", help="outputs are always safetensors")
    g.add_argument("--no-safe-serialization", dest="mk_safe_serialization", action="store_const",
                   const="--no-safe-serialization", help=argparse.SUPPRESS)
    for name, why in MERGEKIT_NO_EFFECT_VALUES.items():
        flags = [f"--{name}", "-j"] if name == "num-threads" else [f"--{name}"]
        g.add_argument(*flags, dest="mk_" + name.replace("-", "_"), metavar="VALUE", help=why)
    return p


def mergekit_notes(args: argparse.Namespace) -> list[str]:
    """One line per mergekit-yaml option given that has no effect here."""
    why = {**{k.replace("-", "_"): v for k, v in MERGEKIT_NO_EFFECT_FLAGS.items()},
           **{k.replace("-", "_"): v for k, v in MERGEKIT_NO_EFFECT_VALUES.items()},
           "gpu_rich": "JAX picks the device (set JAX_PLATFORMS)",
           "safe_serialization": "outputs are always safetensors"}
    notes = []
    for key, reason in why.items():
        given = getattr(args, "mk_" + key, None)
        if given is None:
            continue
        flag = given if given.startswith("--") else f"--{key.replace('_', '-')} {given}"
        if key == "safe_serialization" and given == "--safe-serialization":
            continue  # what hm3jax does
        notes.append(f"note: {flag} (a mergekit-yaml option) has no effect here: {reason}")
    return notes


def _timing_line(t) -> str:
    shape = "x".join(map(str, t.shape)) or "scalar"
    return (f"tensor {t.name} [{shape} {t.dtype}]: load {1e3 * t.load_s:.1f} ms, merge {1e3 * t.merge_s:.1f} ms, "
            f"write {1e3 * t.write_s:.1f} ms")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    kind = "note" if category.__name__ == "RandomMasksNotice" else "warning"
    print(f"{kind}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose > 1, quiet=args.quiet)  # -vv: debug messages too
    for line in mergekit_notes(args):
        print(line, file=sys.stderr)
    early: list[int] = []  # signals before hm3jax.io.interrupt is imported (JAX takes seconds)

    def early_handler(signum, frame):
        early.append(signum)
        if len(early) == 1:
            raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, early_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Imported here so `--help` answers without loading JAX.
        interrupt.install(already=early[0] if early else None)
        interrupt.check()
        with warnings.catch_warnings():
            warnings.simplefilter("always", NonFiniteWarning)
            warnings.simplefilter("always", StaleTempWarning)
            warnings.simplefilter("always", IgnoredKeyWarning)
            warnings.simplefilter("always", RandomMasksNotice)
            warnings.showwarning = _show_warning
            timings = []

            def on_tensor(t):
                timings.append(t)
                print(_timing_line(t), file=sys.stderr)

            out = merge_recipe(args.config, args.out_dir, overwrite=args.overwrite,
                               max_shard_size=args.max_shard_size, seed=args.random_seed,
                               copy_tokenizer=args.copy_tokenizer, prefetch=max(0, args.prefetch),
                               prefetch_bytes=args.prefetch_bytes, progress=not (args.quiet or args.verbose),
                               allow_nonfinite=args.allow_nonfinite, strict=args.strict,
                               compute_dtype=args.compute_dtype, write_card=args.write_model_card,
                               on_tensor=on_tensor if args.verbose else None)
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
    if timings:
        print(f"{len(timings)} tensors: load {sum(t.load_s for t in timings):.2f} s, merge "
              f"{sum(t.merge_s for t in timings):.2f} s, write {sum(t.write_s for t in timings):.2f} s "
              "(loads overlap the merges)", file=sys.stderr)
    logging.getLogger(__name__).info(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
