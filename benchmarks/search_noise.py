"""Why the old lower level could not learn: the noise of scoring each batch on a random minibatch.

    python benchmarks/search_noise.py ZOO_DIR [--rows 48] [--draws 32]

For the 3 preferences of path_search.py (upper level "auto"), scores the merge's identity path and
every single edit of it (one position taken from an expert, or skipped) on the whole search split,
and the identity path on `--draws` random stratified minibatches of `--rows` rows (what every
rollout batch was scored on before the search rows were fixed). Prints the spread of the minibatch
reward against the gains single edits offer, and how many single edits beat the merge.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from path_search import PREFS3, env_config, load, lower_config, search_setup

from hm3jax.objectives import TASK_NAMES, make_suite_batch
from hm3jax.search import env as en
from hm3jax.search.lower import make_model_scorer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--draws", type=int, default=32)
    args = ap.parse_args(argv)
    cfg, models, tok, suite = load(args.zoo_dir)
    batch, heldout = make_suite_batch(suite, "search", tok), make_suite_batch(suite, "heldout", tok)
    env = env_config(actions="edit", reward="tchebycheff", search_minibatch=args.rows, length_penalty=0.0)
    lc = lower_config(env=env)
    data, _, problems, layout, _up = search_setup(cfg, models, batch, heldout, PREFS3, lc, jax.random.key(0))
    scorer = make_model_scorer(cfg, len(TASK_NAMES), lc)
    K, L = layout.num_experts, layout.num_layers
    edits = [np.zeros(L, np.int32)]
    for t in range(L):
        for g in list(range(1, K + 1)) + [layout.skip_gene]:
            e = np.zeros(L, np.int32)
            e[t] = g
            edits.append(e)
    genes = jnp.asarray(np.stack(edits))
    paths = en.decode(layout, genes)
    full = jax.jit(lambda p, paths: en.score_paths(env, layout, scorer, data, p, paths, None)[1])
    mini = jax.jit(lambda p, paths, k: en.score_paths(env, layout, scorer, data, p, paths, k)[1])
    print("| λ | identity reward (whole split) | minibatch reward sd | best single edit gain | "
          "single edits better | same sign on a minibatch |")
    print("|---|---|---|---|---|---|")
    for i, lam in enumerate(PREFS3):
        p = jax.tree.map(lambda x, i=i: x[i], problems)
        r = np.asarray(full(p, paths))
        gain = r[1:] - r[0]
        draws = np.stack([np.asarray(mini(p, paths[jnp.asarray([0, 1 + int(np.argmax(gain))])], jax.random.key(d)))
                          for d in range(args.draws)])
        sd = draws[:, 0].std()
        agree = np.mean((draws[:, 1] - draws[:, 0]) * gain.max() > 0)
        print(f"| {tuple(round(float(x), 2) for x in lam)} | {r[0]:.4f} | {sd:.4f} | {gain.max():+.4f} | "
              f"{int((gain > 0).sum())} of {len(gain)} | {agree:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
