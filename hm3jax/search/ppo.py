"""PPO for the layer-path MDP in the purejaxrl shape, vmapped over preferences.

`make_train(env, agent, ppo, layout, scorer)` returns a `Trainer` of pure functions:
  init(key, problems) -> TrainState;  chunk(state, problems, data) -> (state, ChunkMetrics);
  train(key, problems, data) -> (state, ChunkMetrics of every chunk)  (one program: a scan of chunks).
One iteration = a rollout of `num_envs` paths per preference (lax.scan over steps), ONE scoring call
for all of them (vmapped over paths and preferences), GAE as a reverse scan, then `epochs` x
`minibatches` clipped-PPO updates as scans. At the end of a chunk the chunk's best paths are re-scored
on the whole search split and the best path per preference is kept (BestPaths, search-split scores).

Two modes (PPOConfig.mode):
- "per_preference": the paper's N independent agents, one per λ; the single-agent program is
  jax.vmap-ed over preferences (params, optimiser state and keys carry a leading [N] axis).
- "conditioned": ONE agent (λ is an input) trained on all preferences' rollouts at once; it answers
  a preference it was not trained on by `lower.propose`, without retraining.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hm3jax.models.pool import SKIP
from hm3jax.search import agent as ag
from hm3jax.search import env as en
from hm3jax.search.env import BestPaths, PathLayout, PathProblem, Scorer, _require

MODES = ("per_preference", "conditioned")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings (config keys under `lower.ppo.`).

    Attributes:
      mode: "per_preference" (N vmapped agents) or "conditioned" (one λ-conditioned agent).
      num_envs: paths sampled (and scored) per preference per iteration.
      iterations: PPO iterations in all; a multiple of chunk_iterations.
      chunk_iterations: iterations per jitted chunk (one log line / checkpoint / progress tick).
      epochs, minibatches: PPO passes over each rollout batch and minibatches per pass (the
        minibatches split the episodes; num_envs must be a multiple of minibatches).
      gamma, gae_lambda: discount γ (the paper's 0.99) and GAE λ.
      clip_eps: PPO ratio clip. vf_coef: c1 (value and Q losses). ent_coef: c2 (entropy bonus).
      lr: Adam learning rate of the encoder and actor; critic_lr: of the value and Q heads.
      max_grad_norm: global gradient-norm clip.
    """

    mode: str = "per_preference"
    num_envs: int = 32
    iterations: int = 64
    chunk_iterations: int = 8
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    lr: float = 1e-3
    critic_lr: float = 1e-3
    max_grad_norm: float = 0.5

    def __post_init__(self):
        _require(self.mode in MODES, "lower.ppo.mode", f"one of {', '.join(MODES)}", self.mode)
        for name in ("num_envs", "iterations", "chunk_iterations", "epochs", "minibatches"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"lower.ppo.{name}", "an integer >= 1", v)
        _require(self.iterations % self.chunk_iterations == 0, "lower.ppo.iterations",
                 f"a multiple of lower.ppo.chunk_iterations={self.chunk_iterations}", self.iterations)
        _require(self.num_envs % self.minibatches == 0, "lower.ppo.num_envs",
                 f"a multiple of lower.ppo.minibatches={self.minibatches}", self.num_envs)
        for name in ("gamma", "gae_lambda"):
            v = getattr(self, name)
            _require(0.0 <= v <= 1.0, f"lower.ppo.{name}", "in [0, 1]", v)
        _require(0.0 < self.clip_eps < 1.0, "lower.ppo.clip_eps", "in (0, 1)", self.clip_eps)
        for name in ("vf_coef", "ent_coef"):
            _require(getattr(self, name) >= 0.0, f"lower.ppo.{name}", ">= 0", getattr(self, name))
        for name in ("lr", "critic_lr", "max_grad_norm"):
            _require(getattr(self, name) > 0.0, f"lower.ppo.{name}", "> 0", getattr(self, name))

    @property
    def num_chunks(self) -> int:
        return self.iterations // self.chunk_iterations


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


class ChunkMetrics(NamedTuple):
    """Per iteration of a chunk, per preference: [C, N, ...] from Trainer.chunk."""

    reward: jax.Array         # mean minibatch reward of the rollout batch
    scores: jax.Array         # [C, N, K] mean minibatch scores
    length: jax.Array         # mean path length (layers)
    best_reward: jax.Array    # best minibatch reward in the batch
    entropy: jax.Array
    approx_kl: jax.Array
    value_loss: jax.Array
    paths_scored: jax.Array   # paths scored on minibatches so far (per preference)


class Trainer(NamedTuple):
    """The pure functions of one PPO configuration (see the module docstring).

    init(key, problems [N]) -> state; chunk(state, problems, data) -> (state, ChunkMetrics [C, N]),
    jitted; train(key, problems, data) -> (state, ChunkMetrics [chunks, C, N]), jitted, every chunk
    in one program; group_init / group_chunk: the same for one agent and its G preferences, unjitted
    (per_preference mode vmaps them over N); best(state) -> BestPaths [N]; sample(params, problems
    [G], key) -> Trajectory [G, num_envs, T] of one agent's paths (params of one agent).
    """

    init: Callable
    chunk: Callable
    train: Callable
    group_init: Callable
    group_chunk: Callable
    best: Callable
    sample: Callable


def _raw(key: jax.Array) -> jax.Array:
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


def make_train(env: en.EnvConfig, agent: ag.AgentConfig, ppo: PPOConfig, layout: PathLayout,
               scorer: Scorer) -> Trainer:
    """Build the pure train functions (see the module docstring); nothing is compiled yet."""
    if ppo.mode == "conditioned" and not agent.condition:
        raise ValueError("lower.agent.condition must be True when lower.ppo.mode is 'conditioned' "
                         "(a shared agent must see λ)")
    # eps 1e-5 (purejaxrl's): with 1e-8, Adam turns rounding noise in near-zero gradients into
    # full-size steps, so runs that differ only in summation order (vmapped or not) drift apart
    lr = optax.multi_transform({"actor": optax.adam(ppo.lr, eps=1e-5),
                                "critic": optax.adam(ppo.critic_lr, eps=1e-5)}, ag.param_labels)
    tx = optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), lr)
    B, T = ppo.num_envs, layout.t_max

    def episode(params, problem, key):
        def step(carry, t):
            h, prev, path, done, key = carry
            key, k = jax.random.split(key)
            h = ag.encoder_step(layout, params, problem, h, prev, t)
            a, proto, logp = ag.act(agent, layout, params, problem, h, t, k)
            v = ag.value(agent, params, problem, h)
            a = jnp.where(done, SKIP, a)
            path, new_done = en.append(layout, path, t, a, done)
            return (h, a, path, new_done, key), Trajectory(a, proto, logp, v, ~done)

        init = (ag.initial_hidden(agent, params, problem), jnp.asarray(SKIP, jnp.int32),
                en.initial_path(layout), jnp.asarray(False), key)
        _, traj = jax.lax.scan(step, init, jnp.arange(T))
        return traj

    def sample(params, problems, key):
        """Trajectory [G, B, T]: B paths per problem sampled from one agent."""
        keys = jax.random.split(key, (problems.preference.shape[0], B))
        return jax.vmap(lambda p, ks: jax.vmap(lambda k: episode(params, p, k))(ks))(problems, keys)

    def rollout(params, problems, key, data):
        """Trajectory [G, B, T] and (scores [G, B, K], reward [G, B])."""
        G = problems.preference.shape[0]
        k_roll, k_score = jax.random.split(key)
        traj = sample(params, problems, k_roll)
        score = lambda p, paths, k: en.score_paths(env, layout, scorer, data, p, paths, k)
        scores, reward = jax.vmap(score)(problems, traj.actions, jax.random.split(k_score, G))
        return traj, scores, reward

    def loss_fn(params, problem, traj, adv, targets):
        logp, ent, v, q = jax.vmap(lambda p, a, x: ag.evaluate(agent, layout, params, p, a, x))(
            problem, traj.actions, traj.protos)
        m = traj.valid.astype(jnp.float32)
        mean = lambda x: jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)
        mu = mean(adv)
        adv = (adv - mu) / (jnp.sqrt(mean((adv - mu) ** 2)) + 1e-8)
        ratio = jnp.exp(logp - traj.logp)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - ppo.clip_eps, 1 + ppo.clip_eps) * adv)
        v_clip = traj.values + jnp.clip(v - traj.values, -ppo.clip_eps, ppo.clip_eps)
        v_loss = 0.5 * jnp.maximum((v - targets) ** 2, (v_clip - targets) ** 2)
        q_loss = 0.5 * (q - targets) ** 2 if agent.head == "wolpertinger" else 0.0
        total = mean(pg) + ppo.vf_coef * mean(v_loss + q_loss) - ppo.ent_coef * mean(ent)
        return total, (mean(v_loss), mean(ent), mean((ratio - 1) - jnp.log(ratio)))

    def update(params, opt_state, problems, traj, adv, targets, key):
        G = problems.preference.shape[0]
        n = G * B
        flat = lambda x: x.reshape((n,) + x.shape[2:])
        episodes = (jax.tree.map(lambda x: jnp.repeat(x, B, axis=0), problems),
                    jax.tree.map(flat, traj), flat(adv), flat(targets))

        def epoch(carry, k):
            perm = jax.random.permutation(k, n)
            mbs = jax.tree.map(lambda x: x[perm].reshape((ppo.minibatches, -1) + x.shape[1:]), episodes)

            def minibatch(carry, mb):
                params, opt_state = carry
                (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *mb)
                upd, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, upd), opt_state), aux

            return jax.lax.scan(minibatch, carry, mbs)

        (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state),
                                                jax.random.split(key, ppo.epochs))
        return params, opt_state, jax.tree.map(jnp.mean, aux)

    def iteration(carry, problems, data):
        params, opt_state, key, it = carry
        key, k_roll, k_upd = jax.random.split(key, 3)
        traj, scores, reward = rollout(params, problems, k_roll, data)
        rewards = en.step_rewards(env, reward, traj.valid)
        adv, targets = jax.vmap(jax.vmap(lambda r, v, m: gae(r, v, m, ppo.gamma, ppo.gae_lambda)))(
            rewards, traj.values, traj.valid)
        params, opt_state, (v_loss, ent, kl) = update(params, opt_state, problems, traj, adv, targets, k_upd)
        i = jnp.argmax(reward, axis=1)
        G = reward.shape[0]
        cand = traj.actions[jnp.arange(G), i]
        metrics = ChunkMetrics(reward.mean(1), scores.mean(1),
                               en.path_length(layout, traj.actions).mean(1).astype(jnp.float32),
                               reward.max(1), jnp.full((G,), ent), jnp.full((G,), kl),
                               jnp.full((G,), v_loss), jnp.full((G,), (it + 1) * B, jnp.int32))
        return (params, opt_state, key, it + 1), (metrics, cand)

    def group_init(key, problems):
        """GroupState of a fresh agent for problems [G] (key: typed or raw)."""
        k_params, k_run = jax.random.split(_wrap(key))
        K = problems.preference.shape[-1]
        params = ag.init_agent(agent, layout, problems.summary.shape[-1], K, k_params)
        best = jax.tree.map(lambda x: jnp.broadcast_to(x, (problems.preference.shape[0],) + x.shape),
                            en.empty_best(layout, K))
        return GroupState(params, tx.init(params), _raw(k_run), best, jnp.zeros((), jnp.int32))

    def group_chunk(state: GroupState, problems: PathProblem, data):
        """chunk_iterations iterations, then the best-path update; metrics [C, G, ...]."""
        carry = (state.params, state.opt_state, _wrap(state.key), state.iteration)
        (params, opt_state, key, it), (metrics, cand) = jax.lax.scan(
            lambda c, _: iteration(c, problems, data), carry, None, length=ppo.chunk_iterations)
        upd = lambda p, b, c, r: en.update_best(env, layout, scorer, data, p, b, c, r)
        best = jax.vmap(upd)(problems, state.best, jnp.swapaxes(cand, 0, 1),
                             jnp.swapaxes(metrics.best_reward, 0, 1))
        return GroupState(params, opt_state, _raw(key), best, it), metrics

    per_pref = ppo.mode == "per_preference"
    expand = lambda problems: jax.tree.map(lambda x: x[:, None], problems)

    def init(key, problems):
        if per_pref:
            keys = jax.random.split(_wrap(key), problems.preference.shape[0])
            return jax.vmap(group_init)(keys, expand(problems))
        return group_init(_wrap(key), problems)

    def chunk(state, problems, data):
        if per_pref:
            state, m = jax.vmap(group_chunk, in_axes=(0, 0, None))(state, expand(problems), data)
            return state, jax.tree.map(lambda x: jnp.swapaxes(x[:, :, 0], 0, 1), m)
        return group_chunk(state, problems, data)

    def train(key, problems, data):
        state = init(key, problems)
        return jax.lax.scan(lambda s, _: chunk(s, problems, data), state, None, length=ppo.num_chunks)

    def best(state) -> BestPaths:
        return jax.tree.map(lambda x: x[:, 0], state.best) if per_pref else state.best

    return Trainer(jax.jit(init), jax.jit(chunk), jax.jit(train), group_init, group_chunk, best, sample)


def _wrap(key: jax.Array) -> jax.Array:
    """A typed key from raw uint32 key data or a typed key."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
