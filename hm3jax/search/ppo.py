"""PPO for the layer-path MDP in the purejaxrl shape, vmapped over preferences.

`make_train(env, agent, ppo, layout, scorer)` returns a `Trainer` (search.base: a Searcher) of pure
functions:
  init(key, problems) -> TrainState;  chunk(state, problems, data) -> (state, ChunkMetrics);
  train(key, problems, data) -> (state, ChunkMetrics of every chunk)  (one program: a scan of chunks).
It only binds this module's functions, each pure and usable alone, with the configs as explicit
leading arguments: `rollout` (episode, vmapped), `evaluate_batch` (the path cache), `advantages`
(gae or POMO), `ppo_loss`, `update` (epochs x minibatches of ppo_loss's gradient through
`optimizer(ppo)`), `iteration` (one of each), `group_init` / `group_chunk` / `group_finish` (one
agent and its preferences).
One iteration = a rollout of `num_envs` paths per preference (lax.scan over steps); the distinct
paths not scored before (at most `new_paths`) are scored in ONE call on the search rows (vmapped over
paths and preferences) and added to the preference's path cache, every rollout reads its reward from
the cache; advantages from GAE on the critic (a reverse scan) or POMO's shared mean baseline; then
`epochs` x `minibatches` clipped-PPO updates as scans, with optional self-imitation of the best paths
found. At the end of the search (`finish`) the cache's best paths and the upper level's own answer
(the identity path) are re-scored on the whole search split and the best per preference is kept
(BestPaths, search-split scores); with lower.env.rescore_each_chunk this happens after every chunk
too, and the best kept across them is the answer (a racing answer).

Two modes (PPOConfig.mode):
- "per_preference": the paper's N independent agents, one per λ; the single-agent program is
  jax.vmap-ed over preferences (params, optimiser state and keys carry a leading [N] axis).
- "conditioned": ONE agent (λ is an input) trained on all preferences' rollouts at once; it answers
  a preference it was not trained on by `lower.propose`, without retraining.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hm3jax.models.pool import SKIP
from hm3jax.search import agent as ag
from hm3jax.search import cache as pc
from hm3jax.search import env as en
from hm3jax.search.base import ChunkMetrics, Trainer, raw_key, require, wrap_key
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


def optimizer(ppo: PPOConfig) -> optax.GradientTransformation:
    """The agent's optimiser: the global gradient norm clipped, then Adam on the actor (encoder,
    policy) and on the critic (value and Q heads) with their own learning rates."""
    # eps 1e-5 (purejaxrl's): with 1e-8, Adam turns rounding noise in near-zero gradients into
    # full-size steps, so runs that differ only in summation order (vmapped or not) drift apart
    lr = optax.multi_transform({"actor": optax.adam(ppo.lr, eps=1e-5),
                                "critic": optax.adam(ppo.critic_lr, eps=1e-5)}, ag.param_labels)
    return optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), lr)


def uses_sil(agent: ag.AgentConfig, ppo: PPOConfig) -> bool:
    """Whether the loss imitates the best paths found (sil_coef > 0, categorical head only)."""
    return ppo.sil_coef > 0 and agent.head == "categorical"


def local_count(ppo: PPOConfig) -> int:
    """How many of an iteration's `explore` neighbours are offered the new-path budget before the
    agent's own samples (the rest come after them)."""
    return min(round(ppo.local_share * ppo.paths_per_iteration), ppo.explore)


def episode(agent: ag.AgentConfig, layout: PathLayout, params, problem: PathProblem, key: jax.Array,
            greedy: bool = False) -> Trajectory:
    """One path of one agent for one problem: Trajectory [T] (T = layout.t_max), steps after the
    path's end padded with SKIP and valid False; `greedy` takes each step's most likely action."""
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
    _, traj = jax.lax.scan(step, init, jnp.arange(layout.t_max))
    return traj


def rollout(agent: ag.AgentConfig, layout: PathLayout, num_envs: int, params, problems: PathProblem,
            key: jax.Array) -> Trajectory:
    """Trajectory [G, num_envs, T]: num_envs paths per problem of problems [G] sampled from one
    agent (params of one agent), each with its own key of `key` split [G, num_envs]."""
    keys = jax.random.split(key, (problems.preference.shape[0], num_envs))
    return jax.vmap(lambda p, ks: jax.vmap(lambda k: episode(agent, layout, params, p, k))(ks))(problems, keys)


def greedy_genes(agent: ag.AgentConfig, layout: PathLayout, params, problems: PathProblem) -> jax.Array:
    """genes [G, T]: each problem's most likely path under one agent (no scoring)."""
    key = jax.random.key(0)  # unused by greedy steps
    return jax.vmap(lambda p: episode(agent, layout, params, p, key, greedy=True).actions)(problems)


def ppo_loss(agent: ag.AgentConfig, layout: PathLayout, ppo: PPOConfig, params, problems: PathProblem,
             traj: Trajectory, adv: jax.Array, targets: jax.Array, scored: jax.Array, elites):
    """(loss, (value loss, entropy, approx KL)) of one minibatch of M episodes.

    problems [M] (each episode's problem), traj Trajectory [M, T] (the behaviour policy's actions,
    log-probabilities and values), adv / targets [M, T] (advantages, value targets), scored bool
    [M] (episodes without a score are left out); elites: None, or with self-imitation (uses_sil)
    (problems [G], genes [G, E, T], valid [G, E]) of the best paths found. The loss is clipped PPO
    on the advantages normalised over the minibatch's valid steps, plus vf_coef x the clipped value
    loss (and the Q loss of the Wolpertinger head), minus ent_coef x the entropy, minus sil_coef x
    the elites' mean log-probability.
    """
    logp, ent, v, q = jax.vmap(lambda p, a, x: ag.evaluate(agent, layout, params, p, a, x))(
        problems, traj.actions, traj.protos)
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
    if uses_sil(agent, ppo):
        e_problems, e_genes, e_valid = elites  # [G], [G, E, T], [G, E]
        e_logp = jax.vmap(lambda p, gs: jax.vmap(lambda g: ag.evaluate(
            agent, layout, params, p, g, jnp.zeros(g.shape + (1,)))[0])(gs))(e_problems, e_genes)
        steps = (e_genes >= 0) & e_valid[..., None]
        total = total - ppo.sil_coef * jnp.sum(e_logp * steps) / jnp.maximum(steps.sum(), 1)
    return total, (mean(v_loss), mean(ent), mean((ratio - 1) - jnp.log(ratio)))


def update(agent: ag.AgentConfig, layout: PathLayout, ppo: PPOConfig, tx: optax.GradientTransformation,
           params, opt_state, problems: PathProblem, traj: Trajectory, adv: jax.Array, targets: jax.Array,
           scored: jax.Array, elites, key: jax.Array):
    """`epochs` passes of `minibatches` gradient steps of ppo_loss over the rollout of one agent.

    problems [G], traj Trajectory [G, B, T] (B = num_envs), adv / targets [G, B, T], scored [G, B],
    elites as in ppo_loss; each epoch shuffles the G·B episodes with its own key of `key`. Returns
    (params, opt_state, (value loss, entropy, approx KL) averaged over the steps).
    """
    B = ppo.num_envs
    G = problems.preference.shape[0]
    n = G * B
    flat = lambda x: x.reshape((n,) + x.shape[2:])
    episodes = (jax.tree.map(lambda x: jnp.repeat(x, B, axis=0), problems),
                jax.tree.map(flat, traj), flat(adv), flat(targets), flat(scored))
    loss = functools.partial(ppo_loss, agent, layout, ppo)

    def epoch(carry, k):
        perm = jax.random.permutation(k, n)
        mbs = jax.tree.map(lambda x: x[perm].reshape((ppo.minibatches, -1) + x.shape[1:]), episodes)

        def minibatch(carry, mb):
            params, opt_state = carry
            (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, *mb, elites)
            upd, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), aux

        return jax.lax.scan(minibatch, carry, mbs)

    (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state),
                                            jax.random.split(key, ppo.epochs))
    return params, opt_state, jax.tree.map(jnp.mean, aux)


def advantages(env: en.EnvConfig, ppo: PPOConfig, traj: Trajectory, reward: jax.Array, scored: jax.Array):
    """(advantages, value targets) [G, B, T] of a rollout whose paths earned `reward` [G, B] (0
    where not `scored`): GAE on the critic's values of the per-step rewards, or with the POMO
    baseline, each path's reward minus its problem's mean over the scored paths, at every step."""
    rewards = en.step_rewards(env, reward, traj.valid)
    adv, targets = jax.vmap(jax.vmap(lambda r, v, m: gae(r, v, m, ppo.gamma, ppo.gae_lambda)))(
        rewards, traj.values, traj.valid)
    if ppo.baseline == "pomo":  # reward minus the preference's mean over its scored rollouts
        w = scored.astype(jnp.float32)
        base = jnp.sum(reward * w, 1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        adv = jnp.where(traj.valid, (reward - base)[..., None], 0.0)
    return adv, targets


def iteration(env: en.EnvConfig, agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout, scorer: Scorer,
              tx: optax.GradientTransformation, carry, problems: PathProblem, data):
    """One iteration of one agent on problems [G]: rollout, neighbours (explore), scoring of the new
    distinct paths into the caches, advantages, update. carry = (params, opt_state, key (typed),
    iteration, cache [G]); returns (carry, ChunkMetrics [G]). The key is split (key, rollout,
    update); the neighbours draw from the rollout key folded with 7."""
    params, opt_state, key, it, cache = carry
    B, P, n_local = ppo.num_envs, ppo.paths_per_iteration, local_count(ppo)
    key, k_roll, k_upd = jax.random.split(key, 3)
    traj = rollout(agent, layout, B, params, problems, k_roll)
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
    adv, targets = advantages(env, ppo, traj, reward, scored)
    elites = None
    if uses_sil(agent, ppo):
        e_genes, _, _, e_valid = jax.vmap(lambda c: pc.top(c, min(ppo.sil_elites, c.reward.shape[0])))(cache)
        elites = (problems, e_genes, e_valid)
    params, opt_state, (v_loss, ent, kl) = update(agent, layout, ppo, tx, params, opt_state, problems, traj, adv,
                                                  targets, scored, elites, k_upd)
    G = reward.shape[0]
    w = scored.astype(jnp.float32)
    denom = jnp.maximum(w.sum(1), 1.0)
    metrics = ChunkMetrics(jnp.sum(reward * w, 1) / denom, jnp.sum(scores * w[..., None], 1) / denom[:, None],
                           jnp.sum(en.path_length(layout, paths) * w, 1) / denom,
                           jnp.max(cache.reward, 1), jnp.full((G,), ent), jnp.full((G,), kl),
                           jnp.full((G,), v_loss), cache.count)
    return (params, opt_state, key, it + 1, cache), metrics


def group_init(agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout, tx: optax.GradientTransformation,
               key: jax.Array, problems: PathProblem) -> GroupState:
    """GroupState of a fresh agent for problems [G] (key: typed or raw; split into the agent's
    parameters and the run's key)."""
    k_params, k_run = jax.random.split(wrap_key(key))
    K = problems.preference.shape[-1]
    G = problems.preference.shape[0]
    params = ag.init_agent(agent, layout, problems.summary.shape[-1], K, k_params)
    bcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (G,) + x.shape), tree)
    best = bcast(en.empty_best(layout, K))
    cache = bcast(pc.empty(ppo.budget, layout.t_max, K))
    return GroupState(params, tx.init(params), raw_key(k_run), best, jnp.zeros((), jnp.int32), cache)


def group_chunk(env: en.EnvConfig, agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout, scorer: Scorer,
                tx: optax.GradientTransformation, state: GroupState, problems: PathProblem, data):
    """chunk_iterations iterations of one agent on problems [G]; metrics ChunkMetrics [C, G] (the
    best path is set by group_finish)."""
    carry = (state.params, state.opt_state, wrap_key(state.key), state.iteration, state.cache)
    (params, opt_state, key, it, cache), metrics = jax.lax.scan(
        lambda c, _: iteration(env, agent, ppo, layout, scorer, tx, c, problems, data), carry, None,
        length=ppo.chunk_iterations)
    return GroupState(params, opt_state, raw_key(key), state.best, it, cache), metrics


def group_finish(env: en.EnvConfig, layout: PathLayout, scorer: Scorer, state: GroupState, problems: PathProblem,
                 data) -> GroupState:
    """`state` with each of its G preferences' best path set (finish_best)."""
    best = jax.vmap(lambda p, b, c: finish_best(env, layout, scorer, data, p, b, c))(
        problems, state.best, state.cache)
    return state._replace(best=best)


def make_train(env: en.EnvConfig, agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout,
               scorer: Scorer) -> Trainer:
    """Build the pure train functions (see the module docstring) by binding the module's functions
    to this configuration; nothing is compiled yet."""
    require(ppo.mode != "conditioned" or agent.condition, "lower.agent.condition",
            "True when lower.ppo.mode is 'conditioned' (a shared agent must see λ)", agent.condition)
    require(not layout.edit or agent.head == "categorical", "lower.agent.head",
            "'categorical' with lower.env.actions 'edit' (the Wolpertinger head embeds free actions)", agent.head)
    tx = optimizer(ppo)
    init_one = functools.partial(group_init, agent, ppo, layout, tx)
    chunk_one = functools.partial(group_chunk, env, agent, ppo, layout, scorer, tx)
    finish_one = functools.partial(group_finish, env, layout, scorer)
    per_pref = ppo.mode == "per_preference"
    expand = lambda problems: jax.tree.map(lambda x: x[:, None], problems)

    def init(key, problems):
        if per_pref:
            keys = jax.random.split(wrap_key(key), problems.preference.shape[0])
            return jax.vmap(init_one)(keys, expand(problems))
        return init_one(wrap_key(key), problems)

    def finish(state, problems, data):
        if per_pref:
            return jax.vmap(finish_one, in_axes=(0, 0, None))(state, expand(problems), data)
        return finish_one(state, problems, data)

    def chunk(state, problems, data):
        if per_pref:
            state, m = jax.vmap(chunk_one, in_axes=(0, 0, None))(state, expand(problems), data)
            m = jax.tree.map(lambda x: jnp.swapaxes(x[:, :, 0], 0, 1), m)
        else:
            state, m = chunk_one(state, problems, data)
        if env.rescore_each_chunk:  # the racing answer: finish is idempotent and keeps the best so far
            state = finish(state, problems, data)
        return state, m

    def train(key, problems, data):
        state = init(key, problems)
        state, m = jax.lax.scan(lambda s, _: chunk(s, problems, data), state, None, length=ppo.num_chunks)
        return finish(state, problems, data), m

    def best(state) -> BestPaths:
        return jax.tree.map(lambda x: x[:, 0], state.best) if per_pref else state.best

    sample = functools.partial(rollout, agent, layout, ppo.num_envs)
    greedy = functools.partial(greedy_genes, agent, layout)
    return Trainer(jax.jit(init), jax.jit(chunk), jax.jit(train), init_one, chunk_one, best, sample,
                   jax.jit(greedy), jax.jit(finish))
