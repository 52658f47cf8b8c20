"""Actor-critic for the layer-path MDP: plain-function params (dicts of arrays), so agents vmap.

Encoder: each step's input is the embedding of the previous action — model id, layer id and a fixed
summary of the layer's weights (PathProblem.summary), plus a position embedding; a GRU runs over the
path so far. With `condition` the preference λ sets the GRU's initial state and enters the actor and
critic heads, so one agent serves many preferences.

Policy heads:
- "categorical": logits over every action of the layout's action space (free: every local action;
  edit: keep / expert k / skip / repeat). A fixed additive prior on the identity action (free: the
  merged model's next layer, then STOP; edit: keep) makes the upper level's answer likely at the
  start; the network's last layer starts at ~0, so the prior is the initial policy.
- "wolpertinger" (the paper's): a Gaussian proto-action in a fixed action-embedding space (model
  one-hot, layer position, weight summary); the M' nearest actions are looked up and the Q head
  (dueling: Q = V + A) picks the best with probability 1 - ε, otherwise one of them at random. PPO
  trains the Gaussian (the proto-action's log-probability); the Q head regresses the returns of the
  actions taken. The mean starts at the identity action's embedding and the A head at 0, so the
  nearest candidate (mostly the identity action) is taken at the start.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hm3jax.search import env as en
from hm3jax.search.env import PathLayout, PathProblem
from hm3jax.settings import HEADS, AgentConfig  # noqa: F401

_NEG = -1e9




def _dense(key, fan_in, fan_out, scale=1.0):
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) * (scale / math.sqrt(fan_in))
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _mlp_init(key, fan_in, hidden, out, out_scale):
    k1, k2 = jax.random.split(key)
    return {"l1": _dense(k1, fan_in, hidden), "l2": _dense(k2, hidden, out, out_scale)}


def _mlp(p, x):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


def action_dim(layout: PathLayout, summary_dim: int) -> int:
    """Width of the Wolpertinger action-embedding space."""
    return layout.num_experts + 1 + 1 + summary_dim + 1


def action_space(layout: PathLayout, problem: PathProblem) -> jax.Array:
    """[A, D] fixed action embeddings: model one-hot, layer position in [0, 1], summary / sqrt(S), STOP."""
    a = jnp.arange(layout.num_actions)
    is_stop = a >= layout.num_layer_actions
    model = jax.nn.one_hot(jnp.where(is_stop, -1, layout.model_of(a)), layout.num_experts + 1)
    pos = (layout.layer_of(a) / max(layout.num_layers - 1, 1))[:, None]
    s = problem.summary.shape[-1]
    summ = problem.summary[jnp.minimum(a, layout.num_layer_actions - 1)] / math.sqrt(max(s, 1))
    summ = jnp.where(is_stop[:, None], 0.0, summ)
    return jnp.concatenate([model, jnp.where(is_stop[:, None], 0.0, pos), summ,
                            is_stop[:, None].astype(jnp.float32)], axis=-1)


def init_agent(cfg: AgentConfig, layout: PathLayout, summary_dim: int, num_objectives: int,
               key: jax.Array) -> dict:
    """Fresh agent params (a dict pytree; vmap this over keys for independent agents)."""
    ks = jax.random.split(key, 10)
    E, H, M, K = cfg.embed_dim, cfg.hidden_dim, cfg.mlp_dim, num_objectives
    head_in = H + (K if cfg.condition else 0)
    n = lambda k, shape, s=0.1: s * jax.random.normal(k, shape, jnp.float32)
    params = {
        "embed": {"model": n(ks[0], (layout.num_experts + 2, E)), "layer": n(ks[1], (layout.num_layers, E)),
                  "pos": n(ks[2], (layout.t_max, E)), "start": n(ks[3], (E,)),
                  "summary": _dense(ks[4], max(summary_dim, 1), E, 0.3)["w"]},
        "gru": {"wx": _dense(ks[5], E, 3 * H)["w"], "wh": _dense(ks[6], H, 3 * H)["w"],
                "bx": jnp.zeros((3 * H,)), "bh": jnp.zeros((3 * H,))},
        "critic": _mlp_init(ks[7], head_in, M, 1, 0.1),
    }
    if cfg.condition:
        params["embed"]["pref"] = _dense(ks[8], K, H, 1.0)["w"]
    if cfg.head == "categorical":
        params["actor"] = _mlp_init(ks[9], head_in, M, layout.num_genes, 0.01)
    else:
        D = action_dim(layout, summary_dim)
        k_a, k_q = jax.random.split(ks[9])
        params["actor"] = _mlp_init(k_a, head_in, M, D, 0.01)
        params["log_std"] = jnp.full((D,), math.log(cfg.proto_std), jnp.float32)
        params["q"] = _mlp_init(k_q, head_in + D, M, 1, 0.0)
    return params


def param_labels(params: dict) -> dict:
    """'critic' for the value and Q heads, 'actor' for the rest (encoder included): optax labels."""
    return {k: jax.tree.map(lambda _, k=k: "critic" if k in ("critic", "q") else "actor", v)
            for k, v in params.items()}


# ---------------------------------------------------------------------------------------- encoder

def initial_hidden(cfg: AgentConfig, params: dict, problem: PathProblem) -> jax.Array:
    if cfg.condition:
        return jnp.tanh(problem.preference @ params["embed"]["pref"])
    return jnp.zeros((cfg.hidden_dim,), jnp.float32)


def _input(layout: PathLayout, params: dict, problem: PathProblem, prev: jax.Array, t: jax.Array):
    e = params["embed"]
    a = jnp.clip(prev, 0, layout.num_layer_actions - 1)
    x = e["model"][layout.model_of(a)] + e["layer"][layout.layer_of(a)] + problem.summary[a] @ e["summary"]
    # STOP (free actions) and a skip (edit actions: STOP's index) read STOP's model embedding alone
    x = jnp.where(prev >= layout.num_layer_actions, e["model"][layout.num_experts + 1], x)
    x = jnp.where(prev < 0, e["start"], x)
    return x + e["pos"][jnp.minimum(t, layout.t_max - 1)]


def _gru(params: dict, h: jax.Array, x: jax.Array) -> jax.Array:
    g = params["gru"]
    xr, xz, xn = jnp.split(x @ g["wx"] + g["bx"], 3, axis=-1)
    hr, hz, hn = jnp.split(h @ g["wh"] + g["bh"], 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return (1.0 - z) * n + z * h


def step_input(layout: PathLayout, gene: jax.Array, t: jax.Array, last: jax.Array):
    """(what the encoder reads after `gene` at step t, new last layer): the gene itself (free
    actions), or the local layer it took, STOP's index for a skip (edit actions)."""
    if not layout.edit:
        return gene.astype(jnp.int32), last
    local, last = en.edit_step(layout, gene, t, last)
    return jnp.where(local < 0, layout.num_layer_actions, local).astype(jnp.int32), last


def step_inputs(layout: PathLayout, actions: jax.Array) -> jax.Array:
    """[T] encoder inputs of a recorded episode's actions (see step_input)."""
    def step(last, x):
        a, t = x
        inp, last = step_input(layout, a, t, last)
        return last, inp

    _, inputs = jax.lax.scan(step, jnp.asarray(-1, jnp.int32), (actions, jnp.arange(actions.shape[0])))
    return inputs


def encoder_step(layout, params, problem, h, prev, t):
    """Hidden state after reading the previous action `prev` (-1 at the start) at step t."""
    return _gru(params, h, _input(layout, params, problem, prev, t))


def encode_path(cfg: AgentConfig, layout: PathLayout, params: dict, problem: PathProblem,
                actions: jax.Array) -> jax.Array:
    """[T, H] hidden states h_t, h_t having read actions[:t] (teacher forcing, as in the rollout)."""
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), step_inputs(layout, actions)[:-1]])

    def step(h, xs):
        p, t = xs
        h = encoder_step(layout, params, problem, h, p, t)
        return h, h

    _, hs = jax.lax.scan(step, initial_hidden(cfg, params, problem), (prev, jnp.arange(actions.shape[0])))
    return hs


# ------------------------------------------------------------------------------------------ heads

def _head_input(cfg, problem, h):
    if not cfg.condition:
        return h
    lam = jnp.broadcast_to(problem.preference, h.shape[:-1] + problem.preference.shape[-1:])
    return jnp.concatenate([h, lam], -1)


def value(cfg: AgentConfig, params: dict, problem: PathProblem, h: jax.Array) -> jax.Array:
    return _mlp(params["critic"], _head_input(cfg, problem, h))[..., 0]


def q_values(cfg: AgentConfig, params: dict, problem: PathProblem, h: jax.Array, emb: jax.Array):
    """Advantage part A(h, e) of Q(h, e) = V(h) + A(h, e) for candidate embeddings emb [C, D] -> [C].

    Dueling form: the A head starts at 0, so an action never tried looks average (Q = V), not worse
    than every action tried so far (a plain Q head at 0 would, rewards being positive), and the
    Wolpertinger head keeps trying it."""
    x = _head_input(cfg, problem, h)
    x = jnp.broadcast_to(x, emb.shape[:-1] + x.shape[-1:])
    return _mlp(params["q"], jnp.concatenate([x, emb], -1))[..., 0]


def _allowed(layout: PathLayout, t):
    """bool [A]: STOP is not offered at step 0 (a path has at least one layer)."""
    a = jnp.arange(layout.num_genes)
    if layout.edit:
        return jnp.ones(a.shape, bool)
    return ~((a == layout.stop_action) & (t == 0))


def identity_bias(cfg: AgentConfig, layout: PathLayout) -> float:
    """Logit bonus giving the identity action probability identity_prob against the others."""
    if cfg.identity_prob == 0.0:
        return 0.0
    return math.log(cfg.identity_prob * (layout.num_genes - 1) / (1.0 - cfg.identity_prob))


def logits(cfg, layout, params, problem, h, t):
    """Categorical head: masked logits [A] at step t."""
    out = _mlp(params["actor"], _head_input(cfg, problem, h))
    out = out + identity_bias(cfg, layout) * jax.nn.one_hot(layout.identity_gene(t), layout.num_genes)
    return jnp.where(_allowed(layout, t), out, _NEG)


def proto_mean(cfg, layout, params, problem, h, t):
    """Wolpertinger head: mean [D] of the proto-action (identity action's embedding + network)."""
    emb = action_space(layout, problem)
    return emb[layout.identity_action(t)] + _mlp(params["actor"], _head_input(cfg, problem, h))


def _gauss_logp(x, mean, log_std):
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi), -1)


def act(cfg: AgentConfig, layout: PathLayout, params: dict, problem: PathProblem, h, t, key,
        greedy: bool = False):
    """Sample one step: (action [], proto [D] (zeros for categorical), log-prob []); `greedy` takes
    the most likely action (categorical) or the Q-best neighbour of the mean proto-action."""
    if cfg.head == "categorical":
        lg = logits(cfg, layout, params, problem, h, t)
        a = jnp.argmax(lg) if greedy else jax.random.categorical(key, lg)
        return a.astype(jnp.int32), jnp.zeros((1,), jnp.float32), jax.nn.log_softmax(lg)[a]
    k_proto, k_eps, k_pick = jax.random.split(key, 3)
    mean, log_std = proto_mean(cfg, layout, params, problem, h, t), params["log_std"]
    noise = 0.0 if greedy else jnp.exp(log_std) * jax.random.normal(k_proto, mean.shape)
    proto = mean + noise
    emb = action_space(layout, problem)
    d = jnp.sum((emb - proto) ** 2, -1)
    d = jnp.where(_allowed(layout, t), d, jnp.inf)
    m = min(cfg.knn, layout.num_actions)
    _, cand = jax.lax.top_k(-d, m)  # nearest first; the Q head starts flat, so argmax takes cand[0]
    q = q_values(cfg, params, problem, h, emb[cand])
    best = cand[jnp.argmax(q)]
    rand = cand[jax.random.randint(k_pick, (), 0, m)]
    explore = (jax.random.uniform(k_eps) < cfg.epsilon) & (not greedy)
    a = jnp.where(explore, rand, best)
    return a.astype(jnp.int32), proto, _gauss_logp(proto, mean, log_std)


def evaluate(cfg: AgentConfig, layout: PathLayout, params: dict, problem: PathProblem,
             actions: jax.Array, protos: jax.Array):
    """Re-evaluate a recorded episode: (log-probs [T], entropies [T], values [T], q [T]).

    actions: int [T] local actions (SKIP after the end); protos: [T, D] proto-actions (Wolpertinger)
    or ignored [T, 1]. q is the Q head at the actions taken (zeros for the categorical head).
    """
    hs = encode_path(cfg, layout, params, problem, actions)
    ts = jnp.arange(actions.shape[0])
    v = value(cfg, params, problem, hs)
    safe = jnp.maximum(actions, 0)
    if cfg.head == "categorical":
        lg = jax.vmap(lambda h, t: logits(cfg, layout, params, problem, h, t))(hs, ts)
        logp_all = jax.nn.log_softmax(lg)
        logp = jnp.take_along_axis(logp_all, safe[:, None], -1)[:, 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        return logp, ent, v, jnp.zeros_like(v)
    mean = jax.vmap(lambda h, t: proto_mean(cfg, layout, params, problem, h, t))(hs, ts)
    log_std = params["log_std"]
    logp = _gauss_logp(protos, mean, log_std)
    ent = jnp.broadcast_to(jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e)), logp.shape)
    emb = action_space(layout, problem)[safe]
    adv = jax.vmap(lambda h, e: q_values(cfg, params, problem, h, e[None])[0])(hs, emb)
    return logp, ent, v, jax.lax.stop_gradient(v) + adv
