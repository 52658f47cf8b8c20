"""How well does a path's score on a few search rows rank the paths that matter?

    python benchmarks/search_fidelity.py ZOO_DIR [--rows 48,96,192,384,768] [--draws 24] [--pairs 96]

For the 3 preferences of path_search.py (upper level "auto"), takes the merge's identity path, every
single edit of it (each position from one expert, skipped or repeated) and `--pairs` random two-edit
paths, and scores each on EVERY row of the search split and of the held-out split, keeping per-row
values of three per-task scores:
  exact   teacher-forced exact match (0/1, the run's objective),
  prob    the probability of the whole answer, exp(sum of its token log-probabilities) (the
          expected exact match under sampling: a smooth stand-in for `exact`, in [0, 1]),
  loglik  the mean answer log-likelihood (the `loglik` objective).
The "truth" is the Tchebycheff reward on exact match over the whole search split (and, as a check,
over the held-out split). For each row count r and score, `--draws` stratified draws of r rows each
give a reward per path; the table reports, averaged over draws:
  rho     Spearman correlation with the truth over all candidate paths,
  pick    the truth's gain over the merge of the path ranked first by the r-row reward (what a
          search that trusts r rows would answer; 0 = the merge, the best possible = "oracle"),
  top8    the same for the best of the 8 paths ranked first (re-scored on the whole split, as a
          search's `rescore_top` does),
  held    the held-out gain over the merge of the `top8` path (never seen by any search).
Prints a Markdown table and writes search_fidelity.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from path_search import PREFS3, env_config, load, lower_config, search_setup

from hm3jax.models import forward_path
from hm3jax.models.pool import LayerPool
from hm3jax.moo import tchebycheff
from hm3jax.objectives import make_suite_batch
from hm3jax.objectives.scoring import exact_match, token_logprobs
from hm3jax.search import env as en

SCORES = ("exact", "prob", "loglik")


def candidates(layout, pairs: int, rng) -> np.ndarray:
    """Genes [P, L]: the merge, every single edit, `pairs` distinct random two-edit paths."""
    L, K = layout.num_layers, layout.num_experts
    genes_at = list(range(1, K + 1)) + [layout.skip_gene, layout.repeat_gene]
    out = [np.zeros(L, np.int32)]
    for t in range(L):
        for g in genes_at:
            if g == layout.repeat_gene and t == 0:
                continue
            e = np.zeros(L, np.int32)
            e[t] = g
            out.append(e)
    seen = {tuple(e) for e in out}
    target = len(out) + pairs
    for _ in range(100 * pairs):
        if len(out) >= target:
            break
        e = np.zeros(L, np.int32)
        ts = rng.choice(L, 2, replace=False)
        for t in ts:
            e[t] = rng.choice([g for g in genes_at if not (g == layout.repeat_gene and t == 0)])
        if tuple(e) not in seen:
            seen.add(tuple(e))
            out.append(e)
    return np.stack(out)


def per_row_values(cfg, data, block, paths, chunk=128, batch_paths=8):
    """{score: [P, N]} per-row values of local paths [P, T] (global pool indices) on data.batch."""
    shell = jax.tree.map(lambda x: x[block], data.shells)
    pool = LayerPool(data.layers, (), ())

    def one(path, rows):
        logits = forward_path(cfg, shell, pool, path, rows.tokens, rows.attention_mask, data.align)
        lp = token_logprobs(logits, rows)
        n = jnp.maximum(rows.target_mask[:, :-1].sum(-1), 1)
        return exact_match(logits, rows), jnp.exp(lp.sum(-1)), lp.sum(-1) / n

    rows = jax.jit(jax.vmap(one, in_axes=(0, None)))  # [B paths] x rows

    b = data.batch
    nrows, P = b.tokens.shape[0], paths.shape[0]
    out = {s: np.zeros((P, nrows), np.float32) for s in SCORES}
    for i in range(0, P, batch_paths):
        group = paths[i:i + batch_paths]
        pad = batch_paths - group.shape[0]
        group = jnp.concatenate([group, jnp.repeat(group[-1:], pad, 0)]) if pad else group
        for lo in range(0, nrows, chunk):
            r = jax.tree.map(lambda x, lo=lo: x[lo:lo + chunk], b)
            vals = rows(group, r)
            for s, v in zip(SCORES, vals):
                out[s][i:i + batch_paths, lo:lo + chunk] = np.asarray(v)[:batch_paths - pad]
    return out


def task_index(batch, K):
    tid = np.asarray(batch.task_id)
    has = np.asarray(batch.target_mask).any(-1)
    return [np.flatnonzero((tid == k) & has) for k in range(K)]


def rewards(vals, idx, pref, ideal):
    """Tchebycheff reward [P] from per-row values [P, N] over per-task row indices idx."""
    scores = np.stack([vals[:, i].mean(1) for i in idx], 1)  # [P, K]
    return -np.asarray(tchebycheff(jnp.asarray(scores), jnp.asarray(pref), jnp.asarray(ideal)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("--rows", default="48,96,192,384,768")
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg, models, tok, suite = load(args.zoo_dir)
    batch, heldout = make_suite_batch(suite, "search", tok), make_suite_batch(suite, "heldout", tok)
    env = env_config(actions="edit", reward="tchebycheff", search_minibatch=48, length_penalty=0.0)
    data, held, _, layout, _ = search_setup(cfg, models, batch, heldout, PREFS3, lower_config(env=env),
                                                    jax.random.key(args.seed))
    K = layout.num_experts
    rng = np.random.default_rng(args.seed)
    genes = candidates(layout, args.pairs, rng)
    local = np.asarray(en.decode(layout, jnp.asarray(genes)))
    # ideal points per score: the best expert on the whole split (expert k's path = its own layers)
    expert_paths = np.stack([np.arange(layout.num_layers) + k * layout.num_layers for k in range(K)])
    s_idx, h_idx = task_index(data.batch, K), task_index(held.batch, K)
    row_counts = [int(r) for r in args.rows.split(",")]
    results = []
    for i, pref in enumerate(PREFS3):
        g = np.asarray(en.to_global(layout, jnp.asarray(local), jnp.asarray(i)))
        sv = per_row_values(cfg, data, i, jnp.asarray(g))
        hv = per_row_values(cfg, held, i, jnp.asarray(g))
        ev = per_row_values(cfg, data, i, jnp.asarray(expert_paths))
        ideal = {s: np.stack([ev[s][:, j].mean(1) for j in s_idx], 1).max(0) for s in SCORES}
        truth = rewards(sv["exact"], s_idx, pref, ideal["exact"])
        htruth = rewards(hv["exact"], h_idx, pref, ideal["exact"])
        gain, hgain = truth - truth[0], htruth - htruth[0]
        print(f"λ={tuple(float(x) for x in pref)}: {len(genes)} paths; merge {-truth[0]:.4f} (held-out "
              f"{-htruth[0]:.4f}); oracle gain {gain.max():+.4f} (its held-out gain {hgain[np.argmax(gain)]:+.4f}); "
              f"{int((gain > 0).sum())} paths better than the merge", flush=True)
        for r in row_counts:
            per_task = max(1, r // K)
            for s in SCORES:
                rhos, picks, top8s, helds = [], [], [], []
                for d in range(args.draws):
                    dr = np.random.default_rng([args.seed, r, d])
                    idx = [dr.permutation(ix)[:per_task] for ix in s_idx]
                    est = rewards(sv[s], idx, pref, ideal[s])
                    order = np.argsort(-est, kind="stable")
                    rank_e, rank_t = np.argsort(np.argsort(-est)), np.argsort(np.argsort(-truth))
                    rhos.append(np.corrcoef(rank_e, rank_t)[0, 1])
                    picks.append(gain[order[0]])
                    top = order[:8]
                    best = top[np.argmax(truth[top])]
                    best = best if truth[best] > truth[0] else 0
                    top8s.append(gain[best])
                    helds.append(hgain[best])
                row = dict(pref=[float(x) for x in pref], rows=r, score=s, rho=float(np.mean(rhos)),
                           pick=float(np.mean(picks)), top8=float(np.mean(top8s)), held=float(np.mean(helds)),
                           oracle=float(gain.max()))
                results.append(row)
                print(f"  rows {r:4d} {s:6s}: rho {row['rho']:.2f}  pick {row['pick']:+.4f}  "
                      f"top8 {row['top8']:+.4f}  held {row['held']:+.4f}", flush=True)
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", jax=jax.__version__,
                paths=len(genes), draws=args.draws, seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "search_fidelity.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print("\n| λ | rows | score | Spearman ρ | first pick's gain | best of top 8 | its held-out gain |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {tuple(round(x, 1) for x in row['pref'])} | {row['rows']} | {row['score']} | {row['rho']:.2f} | "
              f"{row['pick']:+.4f} | {row['top8']:+.4f} | {row['held']:+.4f} |")
    print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
