"""PPO for the layer-path MDP in the purejaxrl shape, vmapped over preferences.

`make_train(env, agent, ppo, layout, scorer)` returns a `Trainer` of pure functions:
  init(key, problems) -> TrainState;  chunk(state, problems, data) -> (state, ChunkMetrics);
  train(key, problems, data) -> (state, ChunkMetrics of every chunk)  (one program: a scan of chunks).
One iteration = a rollout of `num_envs` paths per preference (lax.scan over steps); the distinct
paths not scored before (at most `new_paths`) are scored in ONE call on the search rows (vmapped over
paths and preferences) and added to the preference's path cache, every rollout reads its reward from
the cache; advantages from GAE on the critic (a reverse scan) or POMO's shared mean baseline; then
`epochs` x `minibatches` clipped-PPO updates as scans, with optional self-imitation of the best paths
found. At the end of the search (`finish`) the cache's best paths and the upper level's own answer
(the identity path) are re-scored on the whole search split and the best per preference is kept
(BestPaths, search-split scores).

Two modes (PPOConfig.mode):
- "per_preference": the paper's N independent agents, one per λ; the single-agent program is
  jax.vmap-ed over preferences (params, optimiser state and keys carry a leading [N] axis).
- "conditioned": ONE agent (λ is an input) trained on all preferences' rollouts at once; it answers
  a preference it was not trained on by `lower.propose`, without retraining.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hm3jax.models.pool import SKIP
from hm3jax.search import agent as ag
from hm3jax.search import cache as pc
from hm3jax.search import env as en
from hm3jax.search.cache import PathCache
from hm3jax.search.env import BestPaths, PathLayout, PathProblem, Scorer
from hm3jax.settings import BASELINES, MODES, PPOConfig  # noqa: F401


class Trajectory(NamedTuple):
    """A rollout batch, [..., B, T] per field (protos [..., B, T, D])."""

    actions: jax.Array
    protos: jax.Array
    logp: jax.Array
    values: jax.Array
    valid: jax.Array


class GroupState(NamedTuple):
    """One agent and the G preferences it is trained on (per_preference: G = 1, vmapped over N)."""

    params: Any
    opt_state: Any
    key: jax.Array        # raw uint32 key data (orbax stores it as a plain array)
    best: BestPaths       # [G, ...]
    iteration: jax.Array  # int32 []
    cache: PathCache      # [G, ...] every distinct path scored, per preference


class ChunkMetrics(NamedTuple):
    """Per iteration of a chunk, per preference: [C, N, ...] from Trainer.chunk."""

    reward: jax.Array         # mean search-row reward of the rollout batch
    scores: jax.Array         # [C, N, K] mean search-row scores of the rollout batch
    length: jax.Array         # mean path length (layers)
    best_reward: jax.Array    # best search-row reward found so far
    entropy: jax.Array
    approx_kl: jax.Array
    value_loss: jax.Array
    paths_scored: jax.Array   # distinct paths scored so far (per preference): the budget spent


class Trainer(NamedTuple):
    """The pure functions of one search configuration (see the module docstring).

    init(key, problems [N]) -> state; chunk(state, problems, data) -> (state, ChunkMetrics [C, N]),
    jitted; train(key, problems, data) -> (state, ChunkMetrics [chunks, C, N]), jitted, every chunk
    in one program; group_init / group_chunk: the same for one agent and its G preferences, unjitted
    (per_preference mode vmaps them over N); best(state) -> BestPaths [N]; sample(params, problems
    [G], key) -> Trajectory [G, num_envs, T] of one agent's paths (params of one agent);
    greedy(params, problems [G]) -> genes [G, T], the agent's most likely path per preference;
    finish(state, problems, data) -> state whose best paths are set (the cache's best and the
    identity path re-scored on the whole search split: see finish_best), jitted, once at the end.
    """

    init: Callable
    chunk: Callable
    train: Callable
    group_init: Callable
    group_chunk: Callable
    best: Callable
    sample: Callable
    greedy: Callable | None = None
    finish: Callable | None = None


def raw_key(key: jax.Array) -> jax.Array:
    """Raw uint32 key data of a typed key (a raw key as it is): what a searcher keeps in its state,
    since orbax stores plain arrays."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def gae(rewards, values, valid, gamma: float, lam: float):
    """(advantages, returns) [T] of one episode; steps with valid False are padding after the end."""
    nxt_valid = jnp.concatenate([valid[1:], jnp.zeros((1,), bool)])
    nxt_v = jnp.concatenate([values[1:], jnp.zeros((1,))]) * nxt_valid
    delta = rewards + gamma * nxt_v - values

    def back(carry, x):
        d, cont = x
        adv = d + gamma * lam * cont * carry
        return adv, adv

    _, adv = jax.lax.scan(back, 0.0, (delta, nxt_valid.astype(jnp.float32)), reverse=True)
    adv = jnp.where(valid, adv, 0.0)
    return adv, jnp.where(valid, adv + values, 0.0)


def evaluate_batch(env: en.EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                   cache: PathCache, genes: jax.Array, new_paths: int):
    """Score up to `new_paths` distinct paths of `genes` [B, T] that the cache lacks (on the search
    rows), add them to the cache, and read every path's score back.

    Returns (cache, scored bool [B] (the path has a score now), scores [B, K], reward [B], paths [B, T]).
    The paths beyond `new_paths` new ones stay unscored (no budget in this iteration)."""
    paths = en.decode(layout, genes)
    pick, fresh = pc.select_new(cache, paths, new_paths)
    scores, reward = en.score_search_rows(env, layout, scorer, data, problem, paths[pick])
    cache = pc.insert(cache, genes[pick], paths[pick], scores, reward, fresh)
    hit, s, r = pc.lookup(cache, paths)
    return cache, hit, s, r, paths


def update_best_from_cache(env: en.EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                           best: BestPaths, cache: PathCache) -> BestPaths:
    """The best path after re-scoring the cache's `rescore_top` best (by search-row reward) on the
    whole search split (ties keep `best`)."""
    n = min(env.rescore_top, cache.paths.shape[0])
    _, paths, reward, valid = pc.top(cache, n)
    paths = jnp.where(valid[:, None], paths, paths[0])  # fewer scored than n: the best one again
    return en.update_best(env, layout, scorer, data, problem, best, paths, jnp.where(valid, reward, reward[0]))


def seed_best(env: en.EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
              best: BestPaths) -> BestPaths:
    """`best` with the upper level's answer (the identity path) as a candidate, scored on the whole
    search split: a search never reports a path worse there than the merge it started from (the
    search rows are few, so their best path is not always the split's)."""
    ident = en.decode(layout, layout.identity_gene(jnp.arange(layout.t_max)).astype(jnp.int32))[None]
    return en.update_best(env, layout, scorer, data, problem, best, ident, jnp.zeros((1,)))


def finish_best(env: en.EnvConfig, layout: PathLayout, scorer: Scorer, data, problem: PathProblem,
                best: BestPaths, cache: PathCache) -> BestPaths:
    """The search's answer: the best of `best`, the identity path and the cache's `rescore_top`
    best paths (by search-row reward), all scored on the whole search split. Idempotent, so a
    resumed search may call it again."""
    return update_best_from_cache(env, layout, scorer, data, problem, seed_best(env, layout, scorer, data, problem, best),
                                  cache)


def neighbours(layout: PathLayout, cache: PathCache, key: jax.Array, n: int, elites: int) -> jax.Array:
    """genes [n, T]: each one of the `elites` best cached paths' genes with one step (and each other
    step with probability 1/T) re-drawn uniformly; a local search around the best paths found."""
    genes, _, _, valid = pc.top(cache, min(elites, cache.reward.shape[0]))
    k_pick, k_pos, k_more, k_new = jax.random.split(key, 4)
    any_valid = valid.any()
    logits = jnp.where(any_valid, jnp.where(valid, 0.0, -jnp.inf), 0.0)
    base = genes[jax.random.categorical(k_pick, logits, shape=(n,))]
    # nothing scored yet: the neighbours of the upper level's answer
    base = jnp.where(any_valid, base, layout.identity_gene(jnp.arange(layout.t_max)).astype(jnp.int32))
    T = layout.t_max
    one = jax.nn.one_hot(jax.random.randint(k_pos, (n,), 0, T), T, dtype=bool)
    hit = one | (jax.random.uniform(k_more, (n, T)) < 1.0 / T)
    new = jax.random.randint(k_new, (n, T), 0, layout.num_genes)
    if not layout.edit:  # free genes: never STOP first; a re-drawn step after the end is a layer
        new = new.at[:, 0].set(jnp.minimum(new[:, 0], layout.num_layer_actions - 1))
    return jnp.where(hit, new, base).astype(jnp.int32)


def make_train(env: en.EnvConfig, agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout,
               scorer: Scorer) -> Trainer:
    """Build the pure train functions (see the module docstring); nothing is compiled yet."""
    if ppo.mode == "conditioned" and not agent.condition:
        raise ValueError("lower.agent.condition must be True when lower.ppo.mode is 'conditioned' "
                         "(a shared agent must see λ)")
    if layout.edit and agent.head != "categorical":
        raise ValueError("lower.agent.head must be 'categorical' with lower.env.actions 'edit' (the "
                         "Wolpertinger head embeds free actions)")
    # eps 1e-5 (purejaxrl's): with 1e-8, Adam turns rounding noise in near-zero gradients into
    # full-size steps, so runs that differ only in summation order (vmapped or not) drift apart
    lr = optax.multi_transform({"actor": optax.adam(ppo.lr, eps=1e-5),
                                "critic": optax.adam(ppo.critic_lr, eps=1e-5)}, ag.param_labels)
    tx = optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), lr)
    B, T, P = ppo.num_envs, layout.t_max, ppo.paths_per_iteration
    n_local = min(round(ppo.local_share * P), ppo.explore)
    sil = ppo.sil_coef > 0 and agent.head == "categorical"

    def episode(params, problem, key, greedy=False):
        def step(carry, t):
            h, prev, last, path, done, key = carry
            key, k = jax.random.split(key)
            h = ag.encoder_step(layout, params, problem, h, prev, t)
            a, proto, logp = ag.act(agent, layout, params, problem, h, t, k, greedy)
            v = ag.value(agent, params, problem, h)
            a = jnp.where(done, SKIP, a)
            path, new_done = en.append(layout, path, t, a, done)
            nxt, last = ag.step_input(layout, a, t, last)
            return (h, nxt, last, path, new_done, key), Trajectory(a, proto, logp, v, ~done)

        init = (ag.initial_hidden(agent, params, problem), jnp.asarray(SKIP, jnp.int32),
                jnp.asarray(SKIP, jnp.int32), en.initial_path(layout), jnp.asarray(False), key)
        _, traj = jax.lax.scan(step, init, jnp.arange(T))
        return traj

    def sample(params, problems, key):
        """Trajectory [G, B, T]: B paths per problem sampled from one agent."""
        keys = jax.random.split(key, (problems.preference.shape[0], B))
        return jax.vmap(lambda p, ks: jax.vmap(lambda k: episode(params, p, k))(ks))(problems, keys)

    def greedy(params, problems):
        """genes [G, T]: each problem's most likely path under one agent (no scoring)."""
        key = jax.random.key(0)  # unused by greedy steps
        return jax.vmap(lambda p: episode(params, p, key, greedy=True).actions)(problems)

    def loss_fn(params, problem, traj, adv, targets, scored, elites):
        logp, ent, v, q = jax.vmap(lambda p, a, x: ag.evaluate(agent, layout, params, p, a, x))(
            problem, traj.actions, traj.protos)
        m = (traj.valid & scored[:, None]).astype(jnp.float32)
        mean = lambda x: jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)
        mu = mean(adv)
        adv = (adv - mu) / (jnp.sqrt(mean((adv - mu) ** 2)) + 1e-8)
        ratio = jnp.exp(logp - traj.logp)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - ppo.clip_eps, 1 + ppo.clip_eps) * adv)
        v_clip = traj.values + jnp.clip(v - traj.values, -ppo.clip_eps, ppo.clip_eps)
        v_loss = 0.5 * jnp.maximum((v - targets) ** 2, (v_clip - targets) ** 2)
        q_loss = 0.5 * (q - targets) ** 2 if agent.head == "wolpertinger" else 0.0
        total = mean(pg) + ppo.vf_coef * mean(v_loss + q_loss) - ppo.ent_coef * mean(ent)
        if sil:
            e_problems, e_genes, e_valid = elites  # [G], [G, E, T], [G, E]
            e_logp = jax.vmap(lambda p, gs: jax.vmap(lambda g: ag.evaluate(
                agent, layout, params, p, g, jnp.zeros(g.shape + (1,)))[0])(gs))(e_problems, e_genes)
            steps = (e_genes >= 0) & e_valid[..., None]
            total = total - ppo.sil_coef * jnp.sum(e_logp * steps) / jnp.maximum(steps.sum(), 1)
        return total, (mean(v_loss), mean(ent), mean((ratio - 1) - jnp.log(ratio)))

    def update(params, opt_state, problems, traj, adv, targets, scored, elites, key):
        G = problems.preference.shape[0]
        n = G * B
        flat = lambda x: x.reshape((n,) + x.shape[2:])
        episodes = (jax.tree.map(lambda x: jnp.repeat(x, B, axis=0), problems),
                    jax.tree.map(flat, traj), flat(adv), flat(targets), flat(scored))

        def epoch(carry, k):
            perm = jax.random.permutation(k, n)
            mbs = jax.tree.map(lambda x: x[perm].reshape((ppo.minibatches, -1) + x.shape[1:]), episodes)

            def minibatch(carry, mb):
                params, opt_state = carry
                (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *mb, elites)
                upd, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, upd), opt_state), aux

            return jax.lax.scan(minibatch, carry, mbs)

        (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state),
                                                jax.random.split(key, ppo.epochs))
        return params, opt_state, jax.tree.map(jnp.mean, aux)

    def iteration(carry, problems, data):
        params, opt_state, key, it, cache = carry
        key, k_roll, k_upd = jax.random.split(key, 3)
        traj = sample(params, problems, k_roll)
        genes = traj.actions
        if ppo.explore:  # after the agent's own samples: the budget they leave goes to neighbours
            ks = jax.random.split(jax.random.fold_in(k_roll, 7), problems.preference.shape[0])
            extra = jax.vmap(lambda c, k: neighbours(layout, c, k, ppo.explore, ppo.sil_elites))(cache, ks)
            genes = jnp.concatenate([extra[:, :n_local], genes, extra[:, n_local:]], axis=1)
        ev = lambda p, c, g: evaluate_batch(env, layout, scorer, data, p, c, g, P)
        cache, scored, scores, reward, paths = jax.vmap(ev)(problems, cache, genes)
        own = slice(n_local, n_local + B)  # the agent's samples: the PPO batch
        scored, scores, reward, paths = scored[:, own], scores[:, own], reward[:, own], paths[:, own]
        reward = jnp.where(scored, reward, 0.0)
        rewards = en.step_rewards(env, reward, traj.valid)
        adv, targets = jax.vmap(jax.vmap(lambda r, v, m: gae(r, v, m, ppo.gamma, ppo.gae_lambda)))(
            rewards, traj.values, traj.valid)
        if ppo.baseline == "pomo":  # reward minus the preference's mean over its scored rollouts
            w = scored.astype(jnp.float32)
            base = jnp.sum(reward * w, 1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
            adv = jnp.where(traj.valid, (reward - base)[..., None], 0.0)
        elites = None
        if sil:
            e_genes, _, _, e_valid = jax.vmap(lambda c: pc.top(c, min(ppo.sil_elites, c.reward.shape[0])))(cache)
            elites = (problems, e_genes, e_valid)
        params, opt_state, (v_loss, ent, kl) = update(params, opt_state, problems, traj, adv, targets,
                                                      scored, elites, k_upd)
        G = reward.shape[0]
        w = scored.astype(jnp.float32)
        denom = jnp.maximum(w.sum(1), 1.0)
        metrics = ChunkMetrics(jnp.sum(reward * w, 1) / denom, jnp.sum(scores * w[..., None], 1) / denom[:, None],
                               jnp.sum(en.path_length(layout, paths) * w, 1) / denom,
                               jnp.max(cache.reward, 1), jnp.full((G,), ent), jnp.full((G,), kl),
                               jnp.full((G,), v_loss), cache.count)
        return (params, opt_state, key, it + 1, cache), metrics

    def group_init(key, problems):
        """GroupState of a fresh agent for problems [G] (key: typed or raw)."""
        k_params, k_run = jax.random.split(wrap_key(key))
        K = problems.preference.shape[-1]
        G = problems.preference.shape[0]
        params = ag.init_agent(agent, layout, problems.summary.shape[-1], K, k_params)
        bcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (G,) + x.shape), tree)
        best = bcast(en.empty_best(layout, K))
        cache = bcast(pc.empty(ppo.budget, T, K))
        return GroupState(params, tx.init(params), raw_key(k_run), best, jnp.zeros((), jnp.int32), cache)

    def group_chunk(state: GroupState, problems: PathProblem, data):
        """chunk_iterations iterations; metrics [C, G, ...] (the best path is set by finish)."""
        carry = (state.params, state.opt_state, wrap_key(state.key), state.iteration, state.cache)
        (params, opt_state, key, it, cache), metrics = jax.lax.scan(
            lambda c, _: iteration(c, problems, data), carry, None, length=ppo.chunk_iterations)
        return GroupState(params, opt_state, raw_key(key), state.best, it, cache), metrics

    def group_finish(state: GroupState, problems: PathProblem, data):
        best = jax.vmap(lambda p, b, c: finish_best(env, layout, scorer, data, p, b, c))(
            problems, state.best, state.cache)
        return state._replace(best=best)

    per_pref = ppo.mode == "per_preference"
    expand = lambda problems: jax.tree.map(lambda x: x[:, None], problems)

    def init(key, problems):
        if per_pref:
            keys = jax.random.split(wrap_key(key), problems.preference.shape[0])
            return jax.vmap(group_init)(keys, expand(problems))
        return group_init(wrap_key(key), problems)

    def chunk(state, problems, data):
        if per_pref:
            state, m = jax.vmap(group_chunk, in_axes=(0, 0, None))(state, expand(problems), data)
            return state, jax.tree.map(lambda x: jnp.swapaxes(x[:, :, 0], 0, 1), m)
        return group_chunk(state, problems, data)

    def finish(state, problems, data):
        if per_pref:
            return jax.vmap(group_finish, in_axes=(0, 0, None))(state, expand(problems), data)
        return group_finish(state, problems, data)

    def train(key, problems, data):
        state = init(key, problems)
        state, m = jax.lax.scan(lambda s, _: chunk(s, problems, data), state, None, length=ppo.num_chunks)
        return finish(state, problems, data), m

    def best(state) -> BestPaths:
        return jax.tree.map(lambda x: x[:, 0], state.best) if per_pref else state.best

    return Trainer(jax.jit(init), jax.jit(chunk), jax.jit(train), group_init, group_chunk, best, sample,
                   jax.jit(greedy), jax.jit(finish))


def wrap_key(key: jax.Array) -> jax.Array:
    """A typed key from raw uint32 key data or a typed key (the inverse of raw_key)."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
