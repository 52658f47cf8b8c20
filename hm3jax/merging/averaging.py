"""Averaging merges: linear, model_stock, sce, and passthrough (per tensor); semantics of mergekit 0.1.5."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hm3jax.merging.base import REQUIRED, MergeMethod, Param, sum_models
from hm3jax.merging.sparsify import topk_mask
from hm3jax.merging.task_arithmetic import rounding, true_divide


# --------------------------------------------------------------------------------------- linear
def linear_tensor(base, models: Sequence[jax.Array], weights: jax.Array, key=None, *, normalize: bool = True):
    """Weighted average Σ w_i θ_i / Σ w_i (no division when `normalize` is off).

    `base` is ignored: a recipe's base model is one more weighted input, as in mergekit. No guard
    against Σ w_i = 0 (mergekit has none either). models: M arrays `[*S]` (or one `[M, *S]` array),
    weights `[M]` -> `[*S]`.
    """
    del base, key
    models = list(models)
    w = jnp.broadcast_to(jnp.asarray(weights, models[0].dtype), (len(models),))
    # mergekit's order: acc = w_0·θ_0, then acc = w_i·θ_i + acc (torch's addcmul_ is a fused
    # multiply-add; written so, XLA:CPU emits the same FMAs, and float16/bfloat16 recipes, computed
    # in float32 by both, round to the same tensors).
    out = w[0] * models[0]
    for i in range(1, len(models)):
        out = w[i] * models[i] + out
    return true_divide(out, sum_models([w[i] for i in range(len(models))])) if normalize else out


linear = MergeMethod(
    name="linear", base="ignored", random=False, merge_tensor=linear_tensor,
    params={"weight": Param(REQUIRED, per_model=True, doc="coefficient of each model"),
            "normalize": Param(True, static=True, doc="divide by the sum of weights")},
    doc="weighted average of parameters (arXiv:2203.05482)", vmap_layers=True)


# --------------------------------------------------------------------------------------- model stock
def model_stock_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *,
                       filter_wise: bool = False) -> jax.Array:
    """Model Stock: t·mean(θ_i) + (1 − t)·θ_0 with t = N·c / (1 + (N − 1)·c).

    c is the mean pairwise cosine between the offsets θ_i − θ_0 (norm product clamped to >= 1e-6,
    cosines clamped to [-1, 1]); where |1 + (N − 1)c| < 1e-6 (no finite estimate) t = 0 keeps the
    base. `filter_wise` computes c per row (last axis) instead of over the whole tensor. Given
    float16/bfloat16 inputs, every operation rounds to that dtype, as mergekit's torch code does.
    base `[*S]`, models: M >= 2 arrays `[*S]` -> `[*S]`.
    """
    del weights, key
    shape, dt = base.shape, base.dtype
    r = rounding(dt)
    base, models = r(base), [r(x) for x in models]
    if filter_wise:
        w0 = base[None] if base.ndim == 1 else base
        ws = [x[None] if base.ndim == 1 else x for x in models]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in models]
    offsets = [r(x - w0) for x in ws]
    norms = [r(jnp.linalg.norm(o, axis=-1)) for o in offsets]
    n = len(ws)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = r(jnp.sum(r(offsets[i] * offsets[j]), axis=-1))
            cos.append(jnp.clip(r(dot / r(jnp.maximum(r(norms[i] * norms[j]), 1e-6))), -1, 1))
    c = r(true_divide(sum_models(cos), jnp.float32(len(cos))))[..., None]
    den = r(1 + r((n - 1) * c))
    singular = jnp.abs(den) < r(jnp.float32(1e-6))
    t = jnp.where(singular, 0, r(r(n * c) / jnp.where(singular, 1, den)))
    total = ws[0]
    for x in ws[1:]:
        total = r(total + x)
    avg = r(true_divide(total, jnp.float32(n)))
    return r(r(t * avg) + r(r(1 - t) * w0)).reshape(shape).astype(dt)


model_stock = MergeMethod(
    name="model_stock", base="required", random=False, merge_tensor=model_stock_tensor, min_models=2,
    params={"filter_wise": Param(False, static=True, doc="one interpolation ratio per row")},
    doc="geometric interpolation towards the base (arXiv:2403.19522)")


# --------------------------------------------------------------------------------------- SCE
def sce_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *, select_topk=1.0,
               int8_mask: bool = False) -> jax.Array:
    """SCE: select high-variance entries, weight task vectors by their energy, erase sign conflicts.

    τ_i = θ_i − θ_base. With select_topk < 1, keep (for every model) the k = int(count_nonzero(var) ·
    select_topk) entries of largest variance across models (population variance; the product is
    float32, as in mergekit where a torch int tensor times a float is float32; ties by index).
    Weights w_i = mean(τ_i²) / Σ_j mean(τ_j²) (uniform when that sum < 1e-6); entries whose sign
    disagrees with sign(Σ τ) get weight 0; result θ_base + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6).
    Given float16/bfloat16 inputs, every operation rounds to that dtype, as in mergekit.
    base `[*S]`, models: M arrays `[*S]` -> `[*S]`. select_topk scalar (may be traced).
    """
    del weights, key, int8_mask
    dt = base.dtype
    r = rounding(dt)  # 16-bit inputs: every operation rounds to their dtype, as mergekit's torch code does
    base = r(base)
    tvs = [r(r(x) - base) for x in models]
    m = len(tvs)
    topk = jnp.asarray(select_topk, jnp.float32)
    mean = sum_models(tvs) / m
    var = r(sum_models([jnp.square(t - mean) for t in tvs]) / m)  # population variance over models
    k = jnp.floor(jnp.count_nonzero(var).astype(jnp.float32) * topk).astype(jnp.int32)
    keep = jnp.where(topk >= 1, True, jnp.where(topk <= 0, False, topk_mask(var, k)))
    tvs = [jnp.where(keep, t, 0) for t in tvs]
    elected = jnp.where(r(sum_models(tvs)) >= 0, 1.0, -1.0)  # sign election as consensus_mask, rounded
    agree = [jnp.sign(t) == elected for t in tvs]
    energy = jnp.stack([r(jnp.mean(r(jnp.square(t)))) for t in tvs])
    total = r(jnp.sum(energy))
    w = jnp.where(jnp.abs(total) < 1e-6, r(jnp.full_like(energy, 1 / m)), r(energy / total))
    ew = [jnp.where(a, w[i], 0) for i, a in enumerate(agree)]
    merged = r(sum_models([r(t * e) for t, e in zip(tvs, ew)]))
    return r(base + r(merged / r(jnp.maximum(r(sum_models(ew)), 1e-6)))).astype(dt)


sce = MergeMethod(
    name="sce", base="required", random=False, merge_tensor=sce_tensor,
    params={"select_topk": Param(1.0, doc="fraction of highest-variance entries kept"),
            "int8_mask": Param(False, static=True, doc="mergekit memory option; no effect")},
    doc="select, calculate, erase (arXiv:2408.07990)")


# --------------------------------------------------------------------------------------- passthrough
def passthrough_tensor(base, models: Sequence[jax.Array], weights=None, key=None, *, scale=None) -> jax.Array:
    """The single input tensor, times `scale` when given. models: one array `[*S]` -> `[*S]`."""
    del base, weights, key
    x = next(iter(models))
    if scale is None:
        return x
    return x * jnp.reshape(jnp.asarray(scale, x.dtype), (-1,))[0]


passthrough = MergeMethod(
    name="passthrough", base="ignored", random=False, merge_tensor=passthrough_tensor, max_models=1,
    params={"scale": Param(None, per_model=True, doc="optional factor applied to the tensor")},
    doc="copy one model's tensors; with `slices`, stack layer ranges of several models")


def stack_layers(models, slices) -> dict:
    """Passthrough layer stacking on params pytrees (the `slices` recipe form).

    Args:
      models: sequence of params pytrees (models/params.py layout; layer axis first under "layers").
      slices: sequence of (model index, start, end): output layers are models[i] layers [start, end),
        concatenated in order. Embeddings come from the first slice's model, the final norm and head
        from the last slice's model (as mergekit does).
    Returns a params pytree with sum(end − start) layers.
    """
    if not slices:
        raise ValueError("stack_layers: no slices")
    first, last = models[slices[0][0]], models[slices[-1][0]]
    out = {k: v for k, v in first.items() if k not in ("layers", "norm", "lm_head")}
    for k in ("norm", "lm_head"):
        if k in last:
            out[k] = last[k]
    out["layers"] = jax.tree.map(
        lambda *xs: jnp.concatenate(xs, axis=0),
        *[jax.tree.map(lambda x, a=a, b=b: x[a:b], models[i]["layers"]) for i, a, b in slices])
    return out
