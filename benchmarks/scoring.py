"""Candidate scoring throughput: layer paths scored per second, and the FLOP/s that achieves.

Scores batches of random paths through the zoo's layer pool (base + experts) on the search split
with teacher-forced exact match (one forward pass per path, vmapped over paths), and compares the
achieved FLOP/s with a large float32 matmul's in the same run (the machine's practical limit).

    python benchmarks/scoring.py [--zoo runs/zoo] [--paths 16] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.models import build_pool, shell_of
from hm3jax.objectives import make_path_scorer, make_suite_batch, tasks
from hm3jax.objectives.zoo import build_zoo, load_zoo


def path_flops(cfg, n_rows: int, seq: int, steps: int) -> float:
    """Forward FLOPs of one path over the batch (matmuls only: 2 per multiply-add)."""
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    tokens = n_rows * seq
    proj = 2 * tokens * (D * q + 2 * D * kv + q * D + 3 * D * F)
    attn = 2 * 2 * n_rows * cfg.num_attention_heads * seq * seq * hd  # scores + weighted sum
    head = 2 * tokens * D * cfg.vocab_size
    return steps * (proj + attn) + head


def matmul_flops_per_s(n: int = 2048, runs: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default="runs/zoo")
    ap.add_argument("--paths", type=int, default=16, help="paths scored per vmapped call")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    build_zoo(args.zoo)  # cached: reuses an existing zoo
    cfg, models, tokenizer = load_zoo(args.zoo)
    names = list(models)
    pool = build_pool([models[n] for n in names], names=names)
    suite = tasks()
    batch = make_suite_batch(suite, "search", tokenizer)
    n_rows, seq = batch.tokens.shape
    score = make_path_scorer(cfg, shell_of(models["base"]), pool, batch, num_tasks=len(suite))
    vscore = jax.jit(jax.vmap(score))
    L = cfg.num_hidden_layers
    rng = np.random.default_rng(0)

    def draw():
        return jnp.asarray(rng.integers(0, pool.size, (args.paths, L)), jnp.int32)

    jax.block_until_ready(vscore(draw()))  # compile
    ts = []
    for _ in range(args.runs):
        p = draw()
        t = time.perf_counter()
        jax.block_until_ready(vscore(p))
        ts.append(time.perf_counter() - t)
    t = statistics.median(ts)
    achieved = args.paths * path_flops(cfg, n_rows, seq, L) / t
    peak = matmul_flops_per_s()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"zoo model: {L} layers, hidden {cfg.hidden_size}; pool {pool.size} layers; "
          f"search batch {n_rows} rows x {seq} tokens; {args.paths} paths per call")
    print(f"  {args.paths / t:.2f} paths/s (median of {args.runs}, {t * 1e3:.0f} ms per call)")
    print(f"  achieved {achieved / 1e9:.1f} GFLOP/s vs float32 2048^3 matmul {peak / 1e9:.1f} "
          f"GFLOP/s: {100 * achieved / peak:.0f}%")


if __name__ == "__main__":
    main()
