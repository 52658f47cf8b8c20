"""Entry-selective merges: arcee_fusion, nearswap, ram and ramplus_tl (per tensor); mergekit 0.1.5 semantics.

Each decides, entry by entry, how much of each model's change from the base to take: by an importance
score above an outlier threshold (arcee_fusion), by how close the two models already are (nearswap),
or by how many models changed the entry (ram, ramplus_tl).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from hm3jax.merging.base import REQUIRED, MergeMethod, Param, sum_models
from hm3jax.merging.task_arithmetic import LOW_PRECISION, rounding, true_divide


# --------------------------------------------------------------------------------------- arcee_fusion
def order_statistics(x: jax.Array, ranks: Sequence[int]) -> list[jax.Array]:
    """sorted(x.ravel())[r] for each 0-based rank r (static ints), exactly, without sorting.

    Finite float32 values map to uint32 keys in the same order (negative: all bits flipped; else the
    sign bit set), so a histogram over the high 16 bits of the keys finds the bucket holding rank r
    and one over that bucket's low 16 bits the value: two memory-bound passes per rank, shared first.
    """
    bits = lax.bitcast_convert_type(x.reshape(-1).astype(jnp.float32), jnp.uint32)
    key = jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))
    hi = (key >> 16).astype(jnp.int32)
    le = jnp.cumsum(jnp.bincount(hi, length=1 << 16))  # le[p] = count(hi <= p)
    out = []
    for r in ranks:
        need = r + 1
        p = jnp.sum(le < need)  # first bucket whose cumulative count reaches the rank
        below = jnp.where(p > 0, le[jnp.maximum(p - 1, 0)], 0)
        low = jnp.where(hi == p, (key & 0xFFFF).astype(jnp.int32), 1 << 16)  # others to a spare bin
        le_low = jnp.cumsum(jnp.bincount(low, length=(1 << 16) + 1)[:1 << 16])
        q = jnp.sum(le_low < need - below)
        k = (p.astype(jnp.uint32) << 16) | q.astype(jnp.uint32)
        orig = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
        out.append(lax.bitcast_convert_type(orig, jnp.float32))
    return out


def fusion_importance(model: jax.Array, base: jax.Array, eps: float = 1e-8) -> jax.Array:
    """|θ − θ_base| times the KL divergence KL(softmax(θ) ‖ softmax(θ_base)) of each row (last axis).

    Both softmaxes get `eps` added before the divergence; the result has the tensor's shape.
    """
    p = jax.nn.softmax(model, axis=-1) + eps
    q = jax.nn.softmax(base, axis=-1) + eps
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(model - base) * kl


def arcee_fusion_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None) -> jax.Array:
    """Arcee Fusion: take the model's value where its importance is an upper outlier, else the base's.

    importance = fusion_importance(θ, θ_base); threshold = median + 1.5·(Q3 − Q1) of the importances,
    quantile q being the value at index int(q·(n − 1)) of the sorted n entries (as mergekit). Output
    θ_base + (θ − θ_base)·[importance >= threshold]. The quantiles are exact over the whole tensor;
    mergekit estimates them from 10^6 entries drawn at random (with replacement) when the tensor has
    more, so above 10^6 entries the two agree only up to that sampling noise.
    base `[*S]`, models: one array `[*S]` -> `[*S]`.
    """
    del weights, key
    (model,) = models
    if base.dtype in LOW_PRECISION:
        return _arcee_fusion_16bit(base, model)
    imp = fusion_importance(model, base)
    n = imp.size
    q1, med, q3 = order_statistics(imp, [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4])
    threshold = med + 1.5 * (q3 - q1)
    return base + (model - base) * (imp >= threshold).astype(base.dtype)


def _arcee_fusion_16bit(base: jax.Array, model: jax.Array) -> jax.Array:
    """arcee_fusion_tensor on float16/bfloat16 inputs as mergekit's torch code computes it: every
    operation (softmax, the row sums included) computed in float32 and rounded to the 16-bit dtype,
    the threshold from 16-bit scalars; the float32 mask makes the last update float32 (rounded once)."""
    dt = base.dtype
    r = rounding(dt)
    b, m = base.astype(jnp.float32), model.astype(jnp.float32)
    diff = r(m - b)
    p = r(r(jax.nn.softmax(m, axis=-1)) + 1e-8)
    q = r(r(jax.nn.softmax(b, axis=-1)) + 1e-8)
    kl = r(jnp.sum(r(p * r(jnp.log(r(true_divide(p, q))))), axis=-1, keepdims=True))
    imp = r(jnp.abs(diff) * kl)
    n = imp.size
    q1, med, q3 = order_statistics(imp, [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4])
    threshold = r(med + r(1.5 * r(q3 - q1)))
    return (b + diff * (imp >= threshold)).astype(dt)


arcee_fusion = MergeMethod(
    name="arcee_fusion", base="required", random=False, merge_tensor=arcee_fusion_tensor, max_models=1,
    params={}, doc="keep the model's entries whose KL-weighted change is an outlier (arcee.ai)")


# --------------------------------------------------------------------------------------- nearswap
def nearswap_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *, t) -> jax.Array:
    """NearSwap: move each base entry towards the model by w = clip(t / max(|θ_base − θ|, 1e-6), 0, 1).

    Entries closer than t take the model's value; farther ones move by t/|diff|, so the base is kept
    where the models disagree most. Output w·θ + (1 − w)·θ_base. base `[*S]`, models: one array `[*S]`.
    """
    del weights, key
    (model,) = models
    if base.dtype in LOW_PRECISION:  # as torch: t / x is reciprocal(x) * t; every op rounded
        dt, r = base.dtype, rounding(base.dtype)
        a, b = base.astype(jnp.float32), model.astype(jnp.float32)
        x = jnp.maximum(jnp.abs(r(a - b)), r(jnp.float32(1e-6)))
        w = jnp.clip(r(r(true_divide(jnp.float32(1), x)) * jnp.asarray(t, jnp.float32)), 0, 1)
        return r(r(w * b) + r(r(1 - w) * a)).astype(dt)
    t = jnp.asarray(t, base.dtype)
    w = jnp.clip(t / jnp.maximum(jnp.abs(base - model), 1e-6), 0, 1)
    return w * model + (1 - w) * base


nearswap = MergeMethod(
    name="nearswap", base="required", random=False, merge_tensor=nearswap_tensor, max_models=1,
    params={"t": Param(REQUIRED, doc="distance under which an entry takes the model's value")},
    doc="take the model's entries that are near the base's", vmap_layers=True)


# --------------------------------------------------------------------------------------- RAM
def _ram_parts(base: jax.Array, models: Sequence[jax.Array], epsilon):
    """Task vectors zeroed where |τ_i| <= epsilon, and how many models changed each entry."""
    eps = jnp.asarray(epsilon, base.dtype)
    changed = [jnp.abs(x - base) > eps for x in models]
    tvs = [jnp.where(c, x - base, 0) for c, x in zip(changed, models)]
    count = sum_models([c.astype(jnp.int32) for c in changed])
    return tvs, changed, count


def ram_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *,
               epsilon=1e-5) -> jax.Array:
    """RAM: each entry changed (|τ_i| > epsilon) by k models gets the mean of those k changes.

    Output θ_base + Σ_i τ_i·[|τ_i| > ε] / max(k, 1); the base itself when M = 0 (a recipe listing only
    the base). base `[*S]`, models: M >= 0 arrays `[*S]` -> `[*S]`.
    """
    del weights, key
    if not len(models):
        return base
    if base.dtype in LOW_PRECISION:
        return _ram_16bit(base, list(models), epsilon, None)
    tvs, _, count = _ram_parts(base, list(models), epsilon)
    div = jnp.maximum(count, 1).astype(base.dtype)
    return base + sum_models([t / div for t in tvs])


def ramplus_tl_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *,
                      r=0.1, alpha=0.2, epsilon=1e-5) -> jax.Array:
    """RAM+ (tensor-local): RAM with each model's unique changes scaled up by its share of overlap.

    Per model i over the whole tensor: ρ_i = (#entries it shares with another model) / max(#entries
    only it changed, ε), λ_i = 1 + r·clip(ρ_i, 0, α). Entries changed by one model take λ_i·τ_i;
    entries changed by k >= 2 models the mean of their changes; the base itself when M = 0.
    base `[*S]`, models: M >= 0 arrays `[*S]` -> `[*S]`.
    """
    del weights, key
    if not len(models):
        return base
    if base.dtype in LOW_PRECISION:
        return _ram_16bit(base, list(models), epsilon, (r, alpha))
    tvs, changed, count = _ram_parts(base, list(models), epsilon)
    unique, overlap = count == 1, count > 1
    div = jnp.maximum(count, 1).astype(base.dtype)
    eps = jnp.asarray(epsilon, jnp.float32)
    terms = []
    for t, c in zip(tvs, changed):
        shared_n = jnp.sum(c & overlap).astype(jnp.float32)
        unique_n = jnp.sum(c & unique).astype(jnp.float32)
        rho = shared_n / jnp.maximum(unique_n, eps)
        lam = (1 + jnp.asarray(r, jnp.float32) * jnp.clip(rho, 0, jnp.asarray(alpha, jnp.float32)))
        terms.append(jnp.where(unique, t * lam.astype(base.dtype), 0) + jnp.where(overlap, t / div, 0))
    return base + sum_models(terms)


def _ram_16bit(base: jax.Array, models: list, epsilon, gain) -> jax.Array:
    """ram_tensor (gain None) / ramplus_tl_tensor (gain (r, alpha)) on float16/bfloat16 inputs as
    mergekit computes them: task vectors, epsilon and the overlap means rounded to the 16-bit dtype,
    the sum over the models in float32 rounded once; ramplus_tl's float32 gain makes its unique terms,
    the sum and the update float32 (rounded once at the end)."""
    dt = base.dtype
    rd = rounding(dt)
    b = base.astype(jnp.float32)
    tvs = [rd(x.astype(jnp.float32) - b) for x in models]
    changed = [jnp.abs(t) > rd(jnp.float32(epsilon)) for t in tvs]
    count = sum_models([c.astype(jnp.int32) for c in changed])
    unique, overlap = count == 1, count > 1
    div = jnp.maximum(count, 1).astype(jnp.float32)
    terms = []
    for t, c in zip(tvs, changed):
        shared = jnp.where(c & overlap, rd(true_divide(t, div)), 0)
        if gain is None:
            terms.append(jnp.where(c & unique, t, 0) + shared)
        else:
            r, alpha = (jnp.asarray(v, jnp.float32) for v in gain)
            rho = (jnp.sum(c & overlap).astype(jnp.float32)
                   / jnp.maximum(jnp.sum(c & unique).astype(jnp.float32), jnp.float32(epsilon)))
            lam = 1 + r * jnp.clip(rho, 0, alpha)
            terms.append(jnp.where(c & unique, t * lam, 0) + shared)
    merged = sum_models(terms)
    if gain is None:
        return rd(b + rd(merged)).astype(dt)
    return (b + merged).astype(dt)


ram = MergeMethod(
    name="ram", base="required", random=False, merge_tensor=ram_tensor, min_models=0,
    params={"epsilon": Param(1e-5, doc="a |task vector| entry above this counts as changed")},
    doc="Reinforced Agent Merging: mean of the changes made to each entry (arXiv:2601.13572)",
    vmap_layers=True)

ramplus_tl = MergeMethod(
    name="ramplus_tl", base="required", random=False, merge_tensor=ramplus_tl_tensor, min_models=0,
    params={"r": Param(0.1, doc="gain on the overlap ratio"),
            "alpha": Param(0.2, doc="cap on the overlap ratio"),
            "epsilon": Param(1e-5, doc="a |task vector| entry above this counts as changed")},
    doc="RAM+ with per-tensor overlap ratios (arXiv:2601.13572)", vmap_layers=True)

METHODS = (arcee_fusion, nearswap, ram, ramplus_tl)
