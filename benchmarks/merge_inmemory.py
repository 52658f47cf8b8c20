"""In-memory merge throughput: jitted task_arithmetic / ties / dare_ties on a Llama-shaped params pytree,
against a numpy copy of the same number of bytes in the same run (the machine's memory bandwidth).

Each model pytree is about --gb GB of float32 (base + --models fine-tunes). A merge reads M + 1 trees
and writes one, so its effective bandwidth is (M + 2) x tree bytes / time; the reference copies the
same read + write volume with np.copyto. Reports the median of --runs timed runs after a warm-up.

    python benchmarks/merge_inmemory.py [--gb 1.0] [--models 3] [--runs 5] [--trim exact|search]
    python benchmarks/merge_inmemory.py --gb 0.01 --hidden 128 --inter 256 --vocab 1000 --runs 1  # smoke
    HM3JAX_NO_HUGE_PAGES=1 python benchmarks/merge_inmemory.py   # 4 KiB pages for XLA's buffers

Like hm3jax's command-line tools, the script first restarts itself with glibc's malloc asking for
transparent huge pages (`hm3jax.runtime.reexec_with_huge_pages`), so fresh output buffers fault in
2 MiB at a time.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax import merging


def llama_tree(key, gb: float, hidden: int = 2048, inter: int = 5632, vocab: int = 32000) -> dict:
    """A random params pytree (models/params.py layout) of about `gb` GB of float32."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    shell = 2 * vocab * hidden + hidden
    layers = max(1, int((gb * 1e9 / 4 - shell) // per_layer))
    shapes = {
        ("embed_tokens", "weight"): (vocab, hidden), ("norm", "weight"): (hidden,),
        ("lm_head", "weight"): (vocab, hidden),
        ("layers", "input_layernorm", "weight"): (layers, hidden),
        ("layers", "post_attention_layernorm", "weight"): (layers, hidden),
        **{("layers", "self_attn", p, "weight"): (layers, hidden, hidden)
           for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        ("layers", "mlp", "gate_proj", "weight"): (layers, inter, hidden),
        ("layers", "mlp", "up_proj", "weight"): (layers, inter, hidden),
        ("layers", "mlp", "down_proj", "weight"): (layers, hidden, inter),
    }
    tree: dict = {}
    for i, (path, shape) in enumerate(shapes.items()):
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02
    return tree


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def median_time(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of one model pytree in GB (float32)")
    ap.add_argument("--models", type=int, default=3, help="fine-tunes merged into the base")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--trim", default="exact", choices=("exact", "search", "sort"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    args = ap.parse_args()
    shape = dict(hidden=args.hidden, inter=args.inter, vocab=args.vocab)

    key = jax.random.PRNGKey(0)
    base = llama_tree(key, args.gb, **shape)
    models = [jax.tree.map(lambda b, d: b + d, base, llama_tree(jax.random.fold_in(key, i + 1), args.gb, **shape))
              for i in range(args.models)]
    w = jnp.full((args.models,), 1.0 / args.models)
    size = nbytes(base)
    moved = (args.models + 2) * size
    print(f"{platform.node()} | {jax.devices()[0].device_kind} | jax {jax.__version__}")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
    print(f"tree {size / 1e9:.2f} GB x ({args.models} models + base); bytes moved per merge {moved / 1e9:.2f} GB")

    src = np.empty(moved // 2, np.uint8)
    src.fill(1)
    dst = np.empty_like(src)
    t_copy = median_time(functools.partial(np.copyto, dst, src), args.runs)  # reads and writes moved/2 each
    print(f"{'numpy copy':>16}: {t_copy:8.3f} s  {moved / t_copy / 1e9:7.2f} GB/s  (reference)")
    del src, dst

    runs = {
        "task_arithmetic": jax.jit(lambda b, ms, w: merging.task_arithmetic(b, ms, w)),
        "ties": jax.jit(lambda b, ms, w: merging.ties(b, ms, w, density=args.density, trim=args.trim)),
        "dare_ties": jax.jit(lambda b, ms, w: merging.dare_ties(b, ms, w, key=jax.random.PRNGKey(1),
                                                                density=args.density)),
    }
    for name in args.methods.split(","):
        f = runs[name]
        t = median_time(functools.partial(f, base, models, w), args.runs)
        print(f"{name:>16}: {t:8.3f} s  {moved / t / 1e9:7.2f} GB/s  ({t_copy / t:.2f} x copy speed)")


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    main()
