"""Compile time of a jitted TIES merge of a small NNX MLP: params closed over vs passed as arguments,
one weight vector vs vmapped over 9.

A function that closes over concrete params arrays hands them to XLA as constants; when the trim of
those constants does not depend on the traced inputs, XLA's constant folding used to evaluate the whole
top-k (two histograms per tensor) in its HLO interpreter at compile time. Reports seconds from
`jax.jit(...).lower(...).compile()` (tracing + XLA) for each of the four patterns, each in a fresh
compilation (the persistent cache off), and checks the four give the same merged params.

    python benchmarks/ties_compile.py [--width 256] [--depth 3] [--models 3] [--grid 9]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hm3jax import merging


class MLP(nnx.Module):
    def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, 8, rngs=rngs)


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    return seconds, jax.block_until_ready(compiled(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--grid", type=int, default=9, help="weight vectors in the vmapped merge")
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)

    states = [nnx.state(MLP(args.width, args.depth, nnx.Rngs(i))) for i in range(args.models + 1)]
    base, models = states[0], states[1:]
    n = sum(x.size for x in jax.tree.leaves(base))
    w = jnp.full((args.models,), 1.0 / args.models)
    grid = jax.random.dirichlet(jax.random.key(0), jnp.ones(args.models), (args.grid,))
    d = args.density

    cases = {
        "closure": (lambda w: merging.ties(base, models, w, density=d), (w,)),
        "arguments": (lambda b, ms, w: merging.ties(b, ms, w, density=d), (base, models, w)),
        f"closure, vmap over {args.grid}": (
            lambda g: jax.vmap(lambda w: merging.ties(base, models, w, density=d))(g), (grid,)),
        f"arguments, vmap over {args.grid}": (
            lambda b, ms, g: jax.vmap(lambda w: merging.ties(b, ms, w, density=d))(g), (base, models, grid)),
    }
    print(f"{platform.machine()} CPU x{jax.local_device_count()} ({platform.processor() or 'cpu'}), "
          f"jax {jax.__version__}; NNX MLP {args.depth}x{args.width}^2 + head, {n:,} params, "
          f"{args.models} fine-tunes, density {d}")
    results = {}
    for name, (fn, a) in cases.items():
        seconds, out = timed(fn, *a)
        results[name] = out
        print(f"  {name:<28} compile {seconds:6.2f} s")
    one = [results["closure"], results["arguments"]]
    many = [r for k, r in results.items() if "vmap" in k]
    for a, b in ((one[0], one[1]), (many[0], many[1])):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    print("  the closure and argument forms give the same merged params")


if __name__ == "__main__":
    main()
