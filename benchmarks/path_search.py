"""Lower-level benchmark: path-scoring throughput and best Tchebycheff value vs paths scored.

    python benchmarks/path_search.py ZOO_DIR [--out benchmarks] [--iterations 48] [--envs 16]
        [--align] [--identity-prob P] [--methods SUBSTRINGS] [--tag SUFFIX]

Part 1 (throughput): N=8 preferences, per-preference PPO agents vmapped in one jitted chunk, against
the same jitted single-preference program (N=1) called 8 times in a Python loop; paths scored per
second after compilation, and the share of a chunk's wall time outside rollout + scoring (the PPO
update: GAE, epochs, minibatches), measured as 1 - (rollout + scoring alone) / (whole chunk).

Part 2 (search quality): 3 preference vectors, the upper level's DARE-TIES merge (λ as weights) as
each preference's merged model, Tchebycheff reward (no length penalty) on teacher-forced exact match
or, with --objective loglik, the mean answer log-likelihood (ideal point = the best expert per task
on the search split). PPO (categorical and Wolpertinger heads, per-λ and
λ-conditioned), random search and evolutionary search, each with the same number of scored paths;
after every chunk the best path's Tchebycheff value on the whole search split. Writes
path_search.png (curves) and path_search.json, prints a Markdown table (with held-out values).
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

from hm3jax.moo import dirichlet, tchebycheff
from hm3jax.objectives import TASK_NAMES, make_suite_batch, pad_rows
from hm3jax.search import env as en
from hm3jax.search.agent import AgentConfig
from hm3jax.search.align import AlignConfig, fit_alignment
from hm3jax.search.baselines import make_scorer
from hm3jax.search.env import EnvConfig
from hm3jax.search.lower import (
    LowerConfig,
    build_search,
    make_lower_train,
    make_model_scorer,
)
from hm3jax.search.path_baselines import PathSearchConfig, make_path_search
from hm3jax.search.ppo import PPOConfig
from hm3jax.search.upper import UpperConfig, run_upper_many

PREFS3 = np.asarray([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]], np.float32)


def load(zoo_dir):
    try:
        from hm3jax.zoo import ZooConfig, load_zoo, read_manifest
        suite = ZooConfig.from_dict(read_manifest(zoo_dir)["config"]).suite()
    except ImportError:
        from hm3jax.objectives import tasks
        from hm3jax.zoo import load_zoo
        suite = tasks()
    cfg, models, tok = load_zoo(zoo_dir)
    return cfg, models, tok, suite


def setup(cfg, models, batch, prefs, lower_cfg, key):
    experts = [models[t] for t in TASK_NAMES]
    score = jax.jit(make_scorer(cfg, batch, len(experts), lower_cfg.objective))
    expert_scores = np.stack([np.asarray(score(e)) for e in experts])
    ideal = expert_scores.max(0)
    up = run_upper_many(UpperConfig(), models["base"], experts, prefs, ideal, score, key)
    merged = [jax.tree.map(lambda x, i=i: x[i], up.params) for i in range(len(prefs))]
    data, problems, layout = build_search(cfg, experts, merged, batch, prefs, ideal, lower_cfg,
                                          base=models["base"])
    if lower_cfg.align.enabled:  # every method then scores its paths with the same fitted maps
        fit = fit_alignment(cfg, lower_cfg.align, experts, merged, batch, jax.random.fold_in(key, 100))
        print(f"alignment: switch statistics gap {fit.gap_before:.4f} -> {fit.gap_after:.4f}", flush=True)
        data = data._replace(align=fit.alignment)
    return data, problems, layout, up, expert_scores


def timed(fn, *args):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def throughput(cfg, models, batch, args):
    n = 8
    prefs = np.asarray(dirichlet(n, len(TASK_NAMES), 1))
    lc = LowerConfig(env=EnvConfig(search_minibatch=args.minibatch, t_max=args.t_max),
                     ppo=PPOConfig(num_envs=args.envs, minibatches=2, iterations=2 * args.chunk,
                                   chunk_iterations=args.chunk))
    data, problems, layout, *_ = setup(cfg, models, batch, prefs, lc, jax.random.key(0))
    scorer = make_model_scorer(cfg, len(TASK_NAMES), lc)
    tr = make_lower_train(lc, layout, scorer)
    state = tr.init(jax.random.key(0), problems)
    paths = n * lc.ppo.chunk_iterations * lc.ppo.num_envs
    _, t_vmap = timed(tr.chunk, state, problems, data)
    one = [jax.tree.map(lambda x, i=i: x[i:i + 1], (state, problems)) for i in range(n)]

    def loop():
        return [tr.chunk(s, p, data) for s, p in one]

    _, t_loop = timed(loop)

    @jax.jit
    def rollout_and_score(state, problems, data):
        # what a chunk does besides the PPO update: sample paths, score them, per preference
        def it(key, _):
            key, k1, k2 = jax.random.split(key, 3)

            def one(params, p, ks, kr):
                traj = tr.sample(params, jax.tree.map(lambda x: x[None], p), ks)
                return en.score_paths(lc.env, layout, scorer, data, p, traj.actions[0], kr)[1].mean()

            r = jax.vmap(one)(state.params, problems, jax.random.split(k1, n), jax.random.split(k2, n))
            return key, r

        return jax.lax.scan(it, jax.random.key(1), None, length=lc.ppo.chunk_iterations)[1]

    @jax.jit
    def rescore(state, problems, data):
        # the chunk's closing step: its best candidates re-scored on the whole search split
        c = lc.ppo.chunk_iterations
        cand = jnp.broadcast_to(layout.identity_action(jnp.arange(layout.t_max)), (c, layout.t_max))
        rew = jnp.arange(c, dtype=jnp.float32)
        upd = lambda p, b: en.update_best(lc.env, layout, scorer, data, p, b, cand, rew)
        return jax.vmap(upd)(problems, tr.best(state))

    _, t_roll = timed(rollout_and_score, state, problems, data)
    _, t_rescore = timed(rescore, state, problems, data)
    return {"preferences": n, "paths_per_chunk": paths, "vmapped_s": t_vmap, "loop_s": t_loop,
            "vmapped_paths_per_s": paths / t_vmap, "loop_paths_per_s": paths / t_loop,
            "speedup": t_loop / t_vmap, "rollout_score_s": t_roll, "rescore_s": t_rescore,
            "rollout_score_share": t_roll / t_vmap, "rescore_share": t_rescore / t_vmap,
            "ppo_update_share": max(0.0, 1.0 - (t_roll + t_rescore) / t_vmap)}


def quality(cfg, models, batch, heldout, args):
    # no length penalty: the measure is the Tchebycheff value alone
    env = EnvConfig(reward="tchebycheff", search_minibatch=args.minibatch, t_max=args.t_max,
                    length_penalty=0.0)
    ppo = {"num_envs": args.envs, "minibatches": 2, "iterations": args.iterations,
           "chunk_iterations": args.chunk}
    align = AlignConfig(enabled=args.align)
    base_cfg = LowerConfig(env=env, ppo=PPOConfig(**ppo), objective=args.objective, align=align)
    data, problems, layout, up, expert_scores = setup(cfg, models, batch, PREFS3, base_cfg, jax.random.key(0))
    scorer = make_model_scorer(cfg, len(TASK_NAMES), base_cfg)
    methods = {}
    for head in ("categorical", "wolpertinger"):
        for mode in ("per_preference", "conditioned"):
            lc = LowerConfig(env=env, agent=AgentConfig(head=head, identity_prob=args.identity_prob),
                             ppo=PPOConfig(mode=mode, **ppo),
                             objective=args.objective, align=align)
            methods[f"PPO {head} {'per-λ' if mode == 'per_preference' else 'λ-conditioned'}"] = \
                make_lower_train(lc, layout, scorer)
    for m in ("random", "evolution"):
        sc = PathSearchConfig(method=m, population=args.envs, iterations=args.iterations,
                              chunk_iterations=args.chunk)
        methods[f"{m} search"] = make_path_search(sc, env, layout, scorer)
    if args.methods:
        methods = {k: v for k, v in methods.items() if any(m in k for m in args.methods.split(","))}
    curves, final, seconds = {}, {}, {}
    chunks = args.iterations // args.chunk
    for name, tr in methods.items():
        t = time.perf_counter()
        points = []
        state = tr.init(jax.random.key(2), problems)
        for _ in range(chunks):
            state, m = tr.chunk(state, problems, data)
            points.append(np.asarray(tr.best(state).tcheby))
        jax.block_until_ready(state)
        seconds[name] = time.perf_counter() - t
        best = jax.tree.map(np.asarray, tr.best(state))
        curves[name] = np.stack(points)
        final[name] = best
        print(f"{name}: {seconds[name]:.1f} s, best Tchebycheff {np.round(best.tcheby, 4)}", flush=True)
    # held-out Tchebycheff of each method's final best path and of the identity path (never seen by
    # the search): the same scorer on the held-out split, one compiled program for every row
    held_data = data._replace(batch=jax.tree.map(jnp.asarray, pad_rows(heldout, base_cfg.score_chunk)))
    full = jax.jit(scorer.full)
    ideal = np.asarray(problems.ideal[0])
    names = list(final)
    held, ident_held = {n: [] for n in names}, []
    for i in range(len(PREFS3)):
        local = [jnp.asarray(final[n].path[i]) for n in names]
        local.append(layout.identity_action(jnp.arange(layout.t_max)).astype(jnp.int32))
        g = en.to_global(layout, jnp.stack(local), i)
        em = np.asarray(full(held_data, g, jnp.asarray(i, jnp.int32)))  # per-task scores
        t = np.asarray(tchebycheff(em, PREFS3[i], ideal))
        for n, v in zip(names, t[:-1]):
            held[n].append(float(v))
        ident_held.append(float(t[-1]))
    return {"paths_per_chunk": args.envs * args.chunk, "curves": {k: v.tolist() for k, v in curves.items()},
            "final": {k: v.tcheby.tolist() for k, v in final.items()},
            "paths": {k: [[str(s) for s in v.path[i].tolist()] for i in range(len(PREFS3))] for k, v in final.items()},
            "heldout": held, "seconds": seconds, "upper_tcheby": np.asarray(up.tcheby).tolist(),
            "upper_heldout": ident_held, "expert_scores": expert_scores.tolist(),
            "ideal": ideal.tolist(), "t_max": layout.t_max, "num_layers": layout.num_layers}


def _fmt(p) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in p) + ")"


def plot(q, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PREFS3), figsize=(5 * len(PREFS3), 4), sharey=False)
    for i, ax in enumerate(axes):
        for name, c in q["curves"].items():
            c = np.asarray(c)
            x = q["paths_per_chunk"] * np.arange(1, len(c) + 1)
            ax.plot(x, c[:, i], marker="o", ms=3, label=name)
        ax.axhline(q["upper_tcheby"][i], color="k", ls="--", lw=1, label="upper level only (identity path)")
        ax.set_title(f"λ = {_fmt(PREFS3[i])}")
        ax.set_xlabel("paths scored (per preference)")
        ax.set_ylabel("best Tchebycheff (search split, lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--iterations", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=96)
    ap.add_argument("--t-max", type=int, default=None)
    ap.add_argument("--objective", choices=("exact_match", "loglik"), default="exact_match",
                    help="per-task score: exact match, or mean answer log-likelihood (smooth; for "
                         "zoos whose experts have low exact match)")
    ap.add_argument("--align", action="store_true",
                    help="fit lower.align's switch maps first and score every path with them")
    ap.add_argument("--methods", default="",
                    help="comma-separated substrings of the method names to run (default: all)")
    ap.add_argument("--identity-prob", type=float, default=AgentConfig().identity_prob,
                    help="lower.agent.identity_prob of the PPO agents")
    ap.add_argument("--tag", default="", help="suffix of the output files (path_search{tag}.json/.png)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    cfg, models, tok, suite = load(args.zoo_dir)
    batch = make_suite_batch(suite, "search", tok)
    heldout = make_suite_batch(suite, "heldout", tok)
    out = {"zoo": os.path.abspath(args.zoo_dir), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "search_rows": int(batch.tokens.shape[0]),
           "args": vars(args)}
    if not args.skip_throughput:
        out["throughput"] = throughput(cfg, models, batch, args)
        print(json.dumps(out["throughput"], indent=1), flush=True)
    if not args.skip_quality:
        q = quality(cfg, models, batch, heldout, args)
        out["quality"] = q
        plot(q, os.path.join(args.out, f"path_search{args.tag}.png"))
        print("| method | " + " | ".join(f"λ = {_fmt(p)} search / held-out" for p in PREFS3) + " |")
        print("|---|" + "---|" * len(PREFS3))
        print("| upper level only (identity path) | " + " | ".join(
            f"{a:.4f} / {b:.4f}" for a, b in zip(q["upper_tcheby"], q["upper_heldout"])) + " |")
        for name in q["final"]:
            print(f"| {name} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(q["final"][name], q["heldout"][name])) + " |")
    with open(os.path.join(args.out, f"path_search{args.tag}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
