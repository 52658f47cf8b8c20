"""Lower-level benchmark: HM3's path search vs evolution vs random at equal DISTINCT scored paths.

    python benchmarks/path_search.py ZOO_DIR [--seeds 0,1,2] [--budget 1024] [--per-it 16] [--rows 48]
        [--actions edit|free] [--methods "hm3 conditioned,hm3 per-λ,evolution,random"] [--regimes a,b]
        [--train-prefs 64] [--train-budget 256] [--tag SUFFIX] [--throughput]

Every method scores candidates on the same fixed search rows (`--rows`, stratified over the tasks),
keeps every distinct path it scored in a path cache (a path drawn again costs nothing) and scores at
most `--per-it` new distinct paths per iteration; the budget is the count of distinct paths. The
upper level picks its method per preference ("auto"); the reward is -Tchebycheff, no length penalty.
A method's answer after b paths is its `--rescore-top` best (search-row reward; default 2) among its first b distinct paths,
re-scored on the whole search split; the table gives that value (lower is better), and the JSON
holds the held-out value of the same path (never seen by any search).

Regime (a), per preference: 3 preferences, budgets 64 / 256 / 1024; HM3 (the λ-conditioned agent
trained on the 3 at once, and per-λ agents), evolutionary and random path search; 3 seeds (the
seed sets the DARE masks, the search keys), mean and spread over seeds.
Regime (b), amortised: one conditioned agent trained on `--train-prefs` Dirichlet preferences
(`--train-budget` distinct paths each), then asked 8 unseen preferences with 0 extra paths (its most
likely path), 16 and 64 (continued training on them), against evolution started fresh on the
unseen preferences with the same 16 and 64 paths.
`--throughput` also times N=8 vmapped preferences against the same single-preference program in a
loop. Writes path_search{tag}.json and prints Markdown tables.
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
from hm3jax.search.align import fit_alignment
from hm3jax.search.baselines import make_scorer
from hm3jax.search.lower import (
    build_search,
    make_lower_train,
    make_model_scorer,
)
from hm3jax.search.path_baselines import PathSearchConfig, make_path_search
from hm3jax.search.upper import UpperConfig, run_upper_many
from hm3jax.settings import old_agent, old_env, old_lower, old_ppo
from hm3jax.zoo import ZooConfig, load_zoo, read_manifest

PREFS3 = np.asarray([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]], np.float32)

# The lower-level field defaults these benchmarks were run with (and their JSON written on), from
# before the fields became the default run's search (LowerConfig() == DEFAULT_LOWER): pinned where a
# benchmark sets no value, so its settings stay as they were. search_fidelity.py and
# search_noise.py build their configs here too.
env_config, agent_config, ppo_config, lower_config = old_env, old_agent, old_ppo, old_lower


def load(zoo_dir):
    suite = ZooConfig.from_dict(read_manifest(zoo_dir)["config"]).suite()
    cfg, models, tok = load_zoo(zoo_dir)
    return cfg, models, tok, suite


def setup(cfg, models, batch, prefs, lower_cfg, key):
    experts = [models[t] for t in TASK_NAMES]
    score = jax.jit(make_scorer(cfg, batch, len(experts), lower_cfg.objective or "exact_match"))  # None: exact_match, as in the search
    expert_scores = np.stack([np.asarray(score(e)) for e in experts])
    ideal = expert_scores.max(0)
    up = run_upper_many(UpperConfig(method="dare_ties"), models["base"], experts, prefs, ideal, score, key)
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
    lc = lower_config(env=env_config(search_minibatch=args.minibatch, t_max=args.t_max),
                      ppo=ppo_config(num_envs=args.envs, minibatches=2, iterations=2 * args.chunk,
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


# ------------------------------------------------------------------------------- the fair protocol
BUDGETS = (64, 256, 1024)


def search_setup(cfg, models, batch, heldout, prefs, lower_cfg, key):
    """(SearchData on the search split, SearchData on the held-out split, problems, layout, upper
    result) for `prefs`, the upper level picking its method per preference ("auto")."""
    experts = [models[t] for t in TASK_NAMES]
    score = jax.jit(make_scorer(cfg, batch, len(experts), lower_cfg.objective or "exact_match"))  # None: exact_match, as in the search
    ideal = np.stack([np.asarray(score(e)) for e in experts]).max(0)
    up = run_upper_many(UpperConfig(method="auto"), models["base"], experts, prefs, ideal, score, key)
    merged = [jax.tree.map(lambda x, i=i: x[i], up.params) for i in range(len(prefs))]
    data, problems, layout = build_search(cfg, experts, merged, batch, prefs, ideal, lower_cfg, base=models["base"])
    held = data._replace(batch=jax.tree.map(jnp.asarray, pad_rows(heldout, lower_cfg.score_chunk)))
    return data, held, problems, layout, up


def searchers(layout, scorer, env, budget, per_it, chunk, names, local_share=0.5):
    """name -> (Trainer, chunks) of every method compared, each scoring `per_it` new distinct paths
    per iteration up to `budget` per preference."""
    iters = budget // per_it
    ppo = dict(num_envs=4 * per_it, new_paths=per_it, iterations=iters, chunk_iterations=chunk, minibatches=2,
               baseline="pomo", sil_coef=0.5, explore=4 * per_it, local_share=local_share, lr=3e-3,
               critic_lr=3e-3)
    agent = agent_config(identity_prob=0.7)
    out = {}
    for name in names:
        if name.startswith("hm3"):
            mode = "conditioned" if "conditioned" in name else "per_preference"
            lc = lower_config(env=env, agent=agent, ppo=ppo_config(mode=mode, **ppo))
            out[name] = make_lower_train(lc, layout, scorer)
        else:
            method = "evolution" if name.startswith("evolution") else "random"
            sc = PathSearchConfig(method=method, population=per_it, candidates=4 * per_it, iterations=iters,
                                  chunk_iterations=chunk)
            out[name] = make_path_search(sc, env, layout, scorer)
    return out


def best_at(state, budgets, layout, n_rescore=2):
    """Per budget b: the local paths [N, T] the search would report after b distinct paths (its
    n_rescore best by search-row reward among the first b it scored, and the identity path, as
    every search's `finish` does), as candidates [N, n + 1, T]."""
    cache = state.cache
    ident = np.asarray(en.decode(layout, layout.identity_gene(jnp.arange(layout.t_max)).astype(jnp.int32)))
    reward = np.asarray(cache.reward).reshape(-1, cache.reward.shape[-1])
    paths = np.asarray(cache.paths).reshape(-1, *cache.paths.shape[-2:])
    out = {}
    for b in budgets:
        r = np.where(np.arange(reward.shape[1]) < b, reward, -np.inf)
        idx = np.argsort(-r, axis=1, kind="stable")[:, :n_rescore]
        out[b] = np.stack([np.concatenate([paths[i, idx[i]], ident[None]]) for i in range(len(paths))])
    return out


def race_at(state, budgets, layout, n_rescore, every):
    """Per budget b: the candidates of a racing answer [N, n_rescore * (boundaries) + 1, T]: after
    every `every` distinct paths (and at b), the n_rescore best so far by search-row reward are re-scored on the
    whole split and the best re-scored path is kept, so the answer never gets worse with the budget.
    It is the union of best_at's candidates at every boundary up to b (duplicates are harmless: the
    answer is the argmax)."""
    at = best_at(state, sorted({*range(every, max(budgets) + 1, every), *budgets}), layout, n_rescore)
    out = {}
    for b in budgets:
        ends = [c for c in at if c <= b and (c % every == 0 or c == b)]  # the boundaries, and b itself
        # each boundary's n_rescore best without its identity column, then the identity path once
        out[b] = np.concatenate([*(at[c][:, :-1] for c in ends), at[b][:, -1:]], axis=1)
    return out


def full_tcheby(scorer, layout, data, problems, cands, env):
    """(Tchebycheff [N] on the whole split of each preference's best candidate by full-split reward,
    chosen candidate index [N]) for candidates [N, n, T]; also returns the scores [N, K]."""
    full = jax.jit(scorer.full)
    t, s, pick = [], [], []
    for i in range(cands.shape[0]):
        p = jax.tree.map(lambda x, i=i: x[i], problems)
        # the merged block of row i's preference (not i: regime (b) asks preferences n_train.. of the pool)
        g = en.to_global(layout, jnp.asarray(cands[i]), p.block)
        sc = np.asarray(full(data, g, jnp.asarray(p.block, jnp.int32)))
        rew = np.asarray(en.terminal_reward(env, jnp.asarray(sc), p, en.path_length(layout, jnp.asarray(cands[i]))))
        j = int(np.argmax(rew))
        pick.append(j)
        s.append(sc[j])
        t.append(float(tchebycheff(sc[j], p.preference, p.ideal)))
    return np.asarray(t), np.asarray(s), pick


def answer(scorer, layout, data, held, problems, cands, env, with_paths=False):
    """A search's answer among candidates [N, n, T]: each preference's best candidate by reward on the
    whole search split (`data`), re-scored on the held-out split (`held`), as {"search": Tchebycheff
    [N] on the search split, "heldout": the same paths' on the held-out split[, "paths": those local
    paths [N, T]]}."""
    ts, _, pick = full_tcheby(scorer, layout, data, problems, cands, env)
    chosen = np.stack([cands[i, j] for i, j in enumerate(pick)])
    th, _, _ = full_tcheby(scorer, layout, held, problems, chosen[:, None], env)
    out = {"search": ts.tolist(), "heldout": th.tolist()}
    if with_paths:
        out["paths"] = chosen.tolist()
    return out


def answers_line(row, budgets, suffix=""):
    """"b: [search per preference] (held-out [...])" for each budget of a regime (a) row's answers
    `str(b) + suffix`, rounded to 4 digits."""
    return "; ".join(f"{b}: {np.round(row[str(b) + suffix]['search'], 4).tolist()} (held-out "
                     f"{np.round(row[str(b) + suffix]['heldout'], 4).tolist()})" for b in budgets)


def per_preference(cfg, models, batch, heldout, args, seed):
    """Regime (a): each method searches the 3 preferences with `args.budget` distinct paths each;
    the best path after 64 / 256 / 1024 paths, re-scored on the whole search split (and held out)."""
    env = env_config(actions=args.actions, reward="tchebycheff", search_minibatch=args.rows, length_penalty=0.0,
                     rescore_top=args.rescore_top, search_score=args.search_score)
    lc = lower_config(env=env)
    data, held, problems, layout, up = search_setup(cfg, models, batch, heldout, PREFS3, lc, jax.random.key(seed))
    scorer = make_model_scorer(cfg, len(TASK_NAMES), lc)
    budgets = [b for b in BUDGETS if b <= args.budget]
    res = {"upper_tcheby": np.asarray(up.tcheby).tolist(), "upper_method": np.asarray(up.method).tolist()}
    for name, tr in searchers(layout, scorer, env, args.budget, args.per_it, args.chunk, args.methods,
                              args.local_share).items():
        t0 = time.perf_counter()
        state = tr.init(jax.random.key(100 + seed), problems)
        for _ in range(args.budget // args.per_it // args.chunk):
            state, m = tr.chunk(state, problems, data)
        jax.block_until_ready(state)
        secs = time.perf_counter() - t0
        row = {"seconds": secs, "distinct": np.asarray(m.paths_scored[-1]).tolist()}
        # the same searches, answered with `top` paths re-scored on the whole split (key suffix)
        tops = [(top, "" if top == args.rescore_top else f"/top{top}")
                for top in [args.rescore_top, *args.also_rescore_top]]
        for top, suffix in tops:
            for b, cands in best_at(state, budgets, layout, top).items():
                row[str(b) + suffix] = answer(scorer, layout, data, held, problems, cands, env, with_paths=True)
        if args.race_every:  # the same searches, answered by the racing rule (re-score every race_every paths)
            for b, cands in race_at(state, budgets, layout, args.rescore_top, args.race_every).items():
                row[f"{b}/race"] = answer(scorer, layout, data, held, problems, cands, env, with_paths=True)
            print(f"  seed {seed} {name} (race every {args.race_every}, top {args.rescore_top}): "
                  + answers_line(row, budgets, "/race"), flush=True)
        res[name] = row
        for top, suffix in tops:
            print(f"  seed {seed} {name} (top {top}): {secs:.0f} s; " + answers_line(row, budgets, suffix), flush=True)
    return res


def amortised(cfg, models, batch, heldout, args, seed):
    """Regime (b): one conditioned agent trained on `args.train_prefs` sampled preferences
    (args.train_budget distinct paths each), then asked 8 unseen preferences with 0, 16 and 64 extra
    distinct paths each (continued training on those alone), against evolution started fresh on
    them with the same extra paths."""
    K = len(TASK_NAMES)
    train_p = np.asarray(dirichlet(args.train_prefs, K, 1000 + seed), np.float32)
    test_p = np.asarray(dirichlet(8, K, 2000 + seed), np.float32)
    env = env_config(actions=args.actions, reward="tchebycheff", search_minibatch=args.rows, length_penalty=0.0,
                     rescore_top=args.rescore_top, search_score=args.search_score)
    lc = lower_config(env=env)
    prefs = np.concatenate([train_p, test_p])
    data, held, problems, layout, up = search_setup(cfg, models, batch, heldout, prefs, lc, jax.random.key(seed))
    scorer = make_model_scorer(cfg, K, lc)
    n_tr = len(train_p)
    sub = lambda tree, lo, hi: jax.tree.map(lambda x: x[lo:hi], tree)
    train_probs, test_probs = sub(problems, 0, n_tr), sub(problems, n_tr, len(prefs))
    per_it = args.per_it
    agent = agent_config(identity_prob=0.7)
    ppo = dict(mode="conditioned", num_envs=4 * per_it, new_paths=per_it, minibatches=2, baseline="pomo",
               sil_coef=0.5, explore=4 * per_it, local_share=args.local_share, lr=3e-3, critic_lr=3e-3)
    t0 = time.perf_counter()
    tr = make_lower_train(lower_config(env=env, agent=agent, ppo=ppo_config(
        iterations=args.train_budget // per_it, chunk_iterations=args.train_budget // per_it, **ppo)), layout, scorer)
    state, _ = tr.chunk(tr.init(jax.random.key(300 + seed), train_probs), train_probs, data)
    train_s = time.perf_counter() - t0
    out = {"train_prefs": train_p.tolist(), "test_prefs": test_p.tolist(), "train_seconds": train_s,
           "train_paths": args.train_budget * n_tr, "upper_tcheby_test": np.asarray(up.tcheby[n_tr:]).tolist()}
    # zero-shot: the agent's most likely path for each unseen preference, no path scored to choose it
    genes = tr.greedy(state.params, test_probs)
    zero = np.asarray(en.decode(layout, genes))
    out["hm3 0"] = answer(scorer, layout, data, held, test_probs, zero[:, None], env)  # its only candidate
    for extra in (16, 64):
        its = extra // per_it
        ft = make_lower_train(lower_config(env=env, agent=agent, ppo=ppo_config(
            iterations=its, chunk_iterations=its, **ppo)), layout, scorer)
        s1 = ft.init(jax.random.key(400 + seed), test_probs)._replace(params=state.params, opt_state=state.opt_state)
        s1, _ = ft.chunk(s1, test_probs, data)
        # the zero-shot path counts as a candidate too (it is the agent's answer before the search)
        cands = np.concatenate([best_at(s1, [extra], layout, args.rescore_top)[extra], zero[:, None]], axis=1)
        out[f"hm3 {extra}"] = answer(scorer, layout, data, held, test_probs, cands, env)
        sc = PathSearchConfig(method="evolution", population=per_it, candidates=4 * per_it, iterations=its,
                              chunk_iterations=its)
        ev = make_path_search(sc, env, layout, scorer)
        s2, _ = ev.chunk(ev.init(jax.random.key(500 + seed), test_probs), test_probs, data)
        cands = best_at(s2, [extra], layout, args.rescore_top)[extra]
        out[f"evolution {extra}"] = answer(scorer, layout, data, held, test_probs, cands, env)
    print(f"  seed {seed} amortised: train {train_s:.0f} s; " + "; ".join(
        f"{k}: {np.mean(v['search']):.4f}" for k, v in out.items() if isinstance(v, dict)), flush=True)
    return out


def summarise(runs, key, budgets, suffix=""):
    """Mean and spread (min, max) over seeds of each method's mean Tchebycheff value at each budget
    (`suffix`: "/race" or "/topN" for the other answers of the same searches)."""
    lines = []
    names = [k for k in runs[0][key] if isinstance(runs[0][key][k], dict) and "seconds" in runs[0][key][k]]
    for name in names:
        cells = []
        for b in budgets:
            vals = np.asarray([r[key][name][str(b) + suffix]["search"] for r in runs])  # [seeds, prefs]
            per_pref = vals.mean(0)
            cells.append(f"{vals.mean():.4f} [{vals.mean(1).min():.4f}, {vals.mean(1).max():.4f}] ("
                         + "/".join(f"{x:.3f}" for x in per_pref) + ")")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=1024, help="distinct paths per preference, regime (a)")
    ap.add_argument("--per-it", type=int, default=16, help="new distinct paths scored per iteration")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rows", type=int, default=48, help="search rows scoring every path (fixed)")
    ap.add_argument("--actions", choices=("free", "edit"), default="edit")
    ap.add_argument("--methods", default="hm3 conditioned,hm3 per-λ,evolution,random")
    ap.add_argument("--local-share", type=float, default=0.5, help="HM3's lower.ppo.local_share")
    ap.add_argument("--train-prefs", type=int, default=64,
                    help="regime (b): sampled preferences the conditioned agent trains on")
    ap.add_argument("--train-budget", type=int, default=256)
    ap.add_argument("--regimes", default="a,b")
    ap.add_argument("--tag", default="")
    ap.add_argument("--throughput", action="store_true", help="also run the vmapped-vs-loop throughput part")
    ap.add_argument("--minibatch", type=int, default=48)
    ap.add_argument("--rescore-top", type=int, default=2,
                    help="best paths (by search-row reward) re-scored on the whole search split for the answer")
    ap.add_argument("--also-rescore-top", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="regime (a): also answer the same searches with these re-scoring counts, e.g. 8")
    ap.add_argument("--race-every", type=int, default=0,
                    help="regime (a): also answer with the racing rule, re-scoring the --rescore-top best every N paths")
    ap.add_argument("--search-score", choices=("objective", "answer_prob"), default="objective",
                    help="lower.env.search_score: what scores a path on the search rows")
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=None)
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "a" in args.regimes and args.budget < args.per_it * args.chunk:
        ap.error(f"--budget {args.budget} is below one chunk's paths (--per-it {args.per_it} x --chunk "
                 f"{args.chunk} = {args.per_it * args.chunk}): regime (a) would run no search")
    cfg, models, tok, suite = load(args.zoo_dir)
    batch = make_suite_batch(suite, "search", tok)
    heldout = make_suite_batch(suite, "heldout", tok)
    out = {"zoo": os.path.abspath(args.zoo_dir), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "search_rows": int(batch.tokens.shape[0]),
           "args": vars(args), "runs": []}
    if args.throughput:
        out["throughput"] = throughput(cfg, models, batch, args)
        print(json.dumps(out["throughput"], indent=1), flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    path = os.path.join(args.out, f"path_search{args.tag}.json")
    for seed in seeds:
        run = {"seed": seed}
        if "a" in args.regimes:
            run["a"] = per_preference(cfg, models, batch, heldout, args, seed)
        if "b" in args.regimes:
            run["b"] = amortised(cfg, models, batch, heldout, args, seed)
        out["runs"].append(run)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    budgets = [b for b in BUDGETS if b <= args.budget]
    if "a" in args.regimes:
        print("| method | " + " | ".join(f"{b} paths" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        print("\n".join(summarise(out["runs"], "a", budgets)))
        for suffix in [f"/top{t}" for t in args.also_rescore_top] + (["/race"] if args.race_every else []):
            print(f"answered by {suffix[1:]}:")
            print("\n".join(summarise(out["runs"], "a", budgets, suffix)))
    if "b" in args.regimes:
        for k in out["runs"][0]["b"]:
            if isinstance(out["runs"][0]["b"][k], dict):
                v = np.asarray([r["b"][k]["search"] for r in out["runs"]])
                h = np.asarray([r["b"][k]["heldout"] for r in out["runs"]])
                print(f"| {k} | {v.mean():.4f} [{v.mean(1).min():.4f}, {v.mean(1).max():.4f}] | {h.mean():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
