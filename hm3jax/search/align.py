"""Fitting the alignment maps at model switches (HM3's CORAL-style dimension alignment), off by default.

`models.align` applies an affine map to the hidden state wherever a layer path switches models; this
module fits the map MLP so that mapped states match the statistics the entered layer saw in its own
model. The target of pool entry p (layer j of model m) is the mean and covariance, over the valid
tokens of the search split, of the input to layer j when m runs its own layers (`pool_targets`).
`fit_alignment` then samples paths that switch models (identity paths of a random model, each step
swapped with probability `swap_prob` for the same layer of another model), runs them with the
current maps and takes Adam steps on the CORAL loss at every switch: the squared difference of
means plus the squared Frobenius difference of covariances, each relative to the target's scale.
Each step's loss differentiates through its own map only (the state handed over is cut from
autodiff), so fitting never backpropagates through a decoder layer.

The maps are fitted once, before the path search, and then held fixed: a path's score does not
drift while the agent learns, so the best path's recorded score stays its score. (The paper updates
them inside its PPO loop.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hm3jax.models.align import Alignment, init_align_params
from hm3jax.models.decoder import embed, run_layers
from hm3jax.models.pool import shell_of
from hm3jax.settings import AlignConfig


class Targets(NamedTuple):
    """Per pool entry: mean [P, D] and covariance [P, D, D] of the input its own model gives it."""

    mean: jax.Array
    cov: jax.Array


class AlignFit(NamedTuple):
    """fit_alignment's result: the maps, and the mean relative CORAL gap at the switches of a fixed
    sample of paths before (identity maps) and after the fit."""

    alignment: Alignment
    gap_before: float
    gap_after: float


def _stats(x: jax.Array, w: jax.Array | None = None):
    """Mean [D] and covariance [D, D] of states x [..., D], tokens weighted by w [...] (default 1)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w = jnp.ones(x.shape[:1], jnp.float32) if w is None else w.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mu = (w[:, None] * x).sum(0) / n
    xc = (x - mu) * jnp.sqrt(w)[:, None]
    return mu, xc.T @ xc / n


def relative_gap(mu, cov, mu_t, cov_t) -> jax.Array:
    """CORAL loss relative to the target's scale s = mean variance: |Δμ|²/(D·s) + |ΔC|²_F/(D·s)²."""
    d = mu_t.shape[-1]
    s = jnp.maximum(jnp.trace(cov_t) / d, 1e-6)
    return jnp.sum((mu - mu_t) ** 2) / (d * s) + jnp.sum((cov - cov_t) ** 2) / (d * s) ** 2


def coral_gap(x: jax.Array, y: jax.Array) -> jax.Array:
    """The relative CORAL gap between the statistics of states x and y [..., D]."""
    return relative_gap(*_stats(x), *_stats(y))


def pool_alignment(params: dict, num_experts: int, num_layers: int, pool_models: int) -> Alignment:
    """An Alignment for the lower level's global pool: `num_experts` experts, then merged blocks
    (all of the merged kind, num_experts), each of num_layers layers; paths start in the merge's shell."""
    m = np.repeat(np.arange(pool_models), num_layers)
    return Alignment(params, jnp.asarray(np.minimum(m, num_experts), jnp.int32),
                     jnp.asarray(np.tile(np.arange(num_layers), pool_models), jnp.int32),
                     jnp.int32(num_experts))


def pool_targets(model_cfg, models: Sequence[dict], tokens: jax.Array, attention_mask: jax.Array) -> Targets:
    """Targets for a pool of `models` (in pool order): each model's own layer inputs on the rows."""
    @jax.jit
    def one(params):
        L = jax.tree.leaves(params["layers"])[0].shape[0]
        tap = lambda h, mapped, idx, switched: _stats(h, attention_mask)
        _, (mu, cov) = run_layers(model_cfg, params["layers"], jnp.arange(L, dtype=jnp.int32),
                                  embed(shell_of(params), tokens), attention_mask, tap=tap)
        return mu, cov

    outs = [one(m) for m in models]
    return Targets(jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs]))


def sample_switching_paths(key: jax.Array, n: int, num_experts: int, num_layers: int, num_blocks: int,
                           swap_prob: float):
    """(global paths int32 [n, L], blocks int32 [n]): identity paths of a random model (an expert or
    a block's merge), each step swapped with probability swap_prob for the same layer of a random
    model kind."""
    kb, k0, ks, kk = jax.random.split(key, 4)
    K, L = num_experts, num_layers
    block = jax.random.randint(kb, (n,), 0, num_blocks)
    start = jax.random.randint(k0, (n, 1), 0, K + 1)
    swap = jax.random.bernoulli(ks, swap_prob, (n, L))
    kind = jnp.where(swap, jax.random.randint(kk, (n, L), 0, K + 1), start)
    t = jnp.arange(L)[None]
    path = jnp.where(kind < K, kind * L + t, K * L + block[:, None] * L + t)
    return path.astype(jnp.int32), block.astype(jnp.int32)


def _switch_gaps(model_cfg, layers, shells, align: Alignment, targets: Targets, paths, blocks, tokens, mask):
    """[n] mean relative gap over the switches of each path (0 for a path without one), [n] switches."""
    def one(path, block):
        shell = jax.tree.map(lambda x: x[block], shells)

        def tap(h, mapped, idx, switched):
            i = jnp.maximum(idx, 0)
            gap = relative_gap(*_stats(mapped, mask), targets.mean[i], targets.cov[i])
            return jnp.where(switched, gap, 0.0), switched

        _, (gaps, sw) = run_layers(model_cfg, layers, path, embed(shell, tokens), mask, align, tap=tap)
        n = sw.sum()
        return gaps.sum() / jnp.maximum(n, 1), n

    return jax.vmap(one)(paths, blocks)


def fit_alignment(model_cfg, cfg: AlignConfig, experts: Sequence[dict], merged: Sequence[dict], batch,
                  key: jax.Array) -> AlignFit:
    """Fit switch maps for the lower level's global pool (experts, then one merged block per
    preference) on rows of `batch` (the search split). Deterministic for a key."""
    K, N, L = len(experts), len(merged), model_cfg.num_hidden_layers
    task_id = np.asarray(batch.task_id)
    per_task = max(1, cfg.rows // K)
    rows = np.concatenate([np.flatnonzero(task_id == k)[:per_task] for k in range(K)])
    tokens, mask = jnp.asarray(np.asarray(batch.tokens)[rows]), jnp.asarray(np.asarray(batch.attention_mask)[rows])
    models = list(experts) + list(merged)
    targets = pool_targets(model_cfg, models, tokens, mask)
    layers = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[m["layers"] for m in models])
    shells = jax.tree.map(lambda *xs: jnp.stack(xs), *[shell_of(m) for m in merged])
    k_init, k_eval, k_fit = jax.random.split(key, 3)
    params = init_align_params(k_init, model_cfg.hidden_size, K + 1, L, L, cfg.rank, cfg.embed, cfg.width)
    make = lambda p: pool_alignment(p, K, L, K + N)
    opt = optax.adam(cfg.learning_rate)

    def loss(p, paths, blocks):
        gaps, n = _switch_gaps(model_cfg, layers, shells, make(p), targets, paths, blocks, tokens, mask)
        return (gaps * n).sum() / jnp.maximum(n.sum(), 1)

    def step(carry, k):
        p, s = carry
        paths, blocks = sample_switching_paths(k, cfg.paths, K, L, N, cfg.swap_prob)
        value, g = jax.value_and_grad(loss)(p, paths, blocks)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), value

    @jax.jit
    def fit(p):
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k_fit, cfg.steps))
        return p

    eval_paths, eval_blocks = sample_switching_paths(k_eval, 4 * cfg.paths, K, L, N, cfg.swap_prob)
    gap = jax.jit(loss)
    before = float(gap(params, eval_paths, eval_blocks))
    params = fit(params)
    after = float(gap(params, eval_paths, eval_blocks))
    return AlignFit(make(params), before, after)
