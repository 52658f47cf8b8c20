"""Spherical merges: slerp, nuslerp, multislerp and the Karcher mean (per tensor); semantics of mergekit 0.1.5."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hm3jax.merging.base import REQUIRED, MergeMethod, Param, sum_models
from hm3jax.merging.task_arithmetic import LOW_PRECISION, rounding, true_divide


# --------------------------------------------------------------------------------------- slerp
def slerp_pair(t, v0: jax.Array, v1: jax.Array, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation of two whole tensors (one angle per tensor).

    The angle comes from the normalised tensors (a norm <= eps counts as 1); the interpolation is
    applied to the raw tensors. When |cos| > dot_threshold (nearly collinear or antipodal) it falls
    back to (1 − t)·v0 + t·v1. t = 0 gives v0 exactly.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    t = jnp.asarray(t, a.dtype)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    na, nb = jnp.where(na > eps, na, 1), jnp.where(nb > eps, nb, 1)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0, dot))
    sin_theta = jnp.where(lin, 1, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
    return (ca * a + cb * b).reshape(v0.shape)


def slerp_tensor(base: jax.Array, models: Sequence[jax.Array], weights=None, key=None, *, t) -> jax.Array:
    """SLERP from the base (t = 0) to the one other model (t = 1). models: one array `[*S]` -> `[*S]`."""
    del weights, key
    return slerp_pair(t, base, next(iter(models)))


slerp = MergeMethod(
    name="slerp", base="required", random=False, merge_tensor=slerp_tensor, max_models=1,
    params={"t": Param(REQUIRED, doc="interpolation factor: 0 = base, 1 = the other model")},
    doc="spherical linear interpolation between the base and one model")


# --------------------------------------------------------------------------------------- nuslerp
def _nuslerp(t, v0: jax.Array, v1: jax.Array, row_wise: bool, flatten: bool, eps: float = 1e-8, r=None,
             one_minus_t=None):
    r = r or (lambda v: v)  # rounding after each operation (16-bit inputs; see nuslerp_tensor)
    omt = 1 - t if one_minus_t is None else one_minus_t
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.ndim > 1:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def unit(x):
        return r(true_divide(x, r(jnp.maximum(r(jnp.linalg.norm(x, axis=-1, keepdims=True)), 1e-7))))

    cos = jnp.clip(r(jnp.sum(r(unit(v0) * unit(v1)), axis=-1, keepdims=True)), -1, 1)
    colinear = r(1 - r(jnp.square(cos))) <= r(jnp.float32(eps ** 2))
    theta = r(jnp.arccos(jnp.where(colinear, 0, cos)))
    sin_theta = jnp.where(colinear, 1, r(jnp.sin(theta)))
    res = r(true_divide(r(r(r(jnp.sin(r(omt * theta))) * v0) + r(r(jnp.sin(r(t * theta))) * v1)), sin_theta))
    res = jnp.where(colinear, r(r(omt * v0) + r(t * v1)), res)
    if not flatten and row_wise and res.ndim > 1:
        res = jnp.swapaxes(res, 0, -1)
    return res.reshape(shape)


def nuslerp_tensor(base, models: Sequence[jax.Array], weights: jax.Array, key=None, *, nuslerp_row_wise: bool = False,
                   nuslerp_flatten: bool = True, t_host=None) -> jax.Array:
    """NuSLERP between two models, of their task vectors when a base is given.

    t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6). `nuslerp_flatten` (default) uses one angle
    per tensor; otherwise one per row (last axis), or with `nuslerp_row_wise` one per slice along
    axis 0 (mergekit's transpose). Exactly collinear pairs are interpolated linearly. `t_host`:
    [t, 1 − t] computed in float64 from the recipe's weights (`nuslerp_prepare`), as mergekit computes
    them in Python, so 16-bit merges round alike.
    base `[*S]` or None, models: two arrays `[*S]`, weights `[2]` -> `[*S]`.
    """
    del key
    models = list(models)
    w = jnp.asarray(weights, jnp.float32)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(total) < 1e-6, 1, total))
    dt = models[0].dtype
    r = rounding(dt)  # 16-bit inputs: every operation rounds to their dtype, as mergekit's torch code does
    omt = None
    if t_host is not None:
        t, omt = t_host[0], t_host[1]
    if dt not in LOW_PRECISION:
        t = t.astype(dt)
        omt = None if omt is None else omt.astype(dt)
    ms = [r(x) for x in models]
    if base is None:
        return _nuslerp(t, ms[0], ms[1], nuslerp_row_wise, nuslerp_flatten, r=r, one_minus_t=omt).astype(dt)
    b = r(base)
    return r(b + _nuslerp(t, r(ms[0] - b), r(ms[1] - b), nuslerp_row_wise, nuslerp_flatten, r=r,
                          one_minus_t=omt)).astype(dt)


def nuslerp_prepare(params: dict, shape: tuple) -> dict:
    """Host hook: t and 1 − t from the float64 weights, when given (the out-of-core merge gives them)."""
    w = params.get("weight")
    if w is not None and np.ndim(w) == 1 and len(w) == 2 and not isinstance(w, jax.core.Tracer):
        w = np.asarray(w, np.float64)
        total = w[0] + w[1]
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        params["t_host"] = np.asarray([t, 1 - t], np.float64)
    return params


nuslerp = MergeMethod(
    name="nuslerp", base="optional", random=False, merge_tensor=nuslerp_tensor, min_models=2, max_models=2,
    prepare=nuslerp_prepare,
    params={"weight": Param(REQUIRED, per_model=True, doc="relative weight of each of the two models"),
            "nuslerp_row_wise": Param(False, static=True, doc="one angle per slice along axis 0"),
            "nuslerp_flatten": Param(True, static=True, doc="one angle per whole tensor")},
    doc="SLERP with weights, optionally of task vectors")


# --------------------------------------------------------------------------------------- multislerp
def multislerp_tensor(base, models: Sequence[jax.Array], weights: jax.Array, key=None, *,
                      normalize_weights: bool = True, eps=1e-8) -> jax.Array:
    """Multi-SLERP: a weighted barycentre of M tensors on the hypersphere, of task vectors with a base.

    x_i = θ_i − θ_base (θ_i without a base), flattened; u_i = x_i / (‖x_i‖ + eps); weights w (divided
    by their sum when `normalize_weights`). The weighted mean direction m = Σ w_i u_i / ‖Σ w_i u_i‖;
    the weighted tangent vector v = Σ w_i (u_i − (u_i·m) m) at m is mapped back by the exponential
    map, m cos‖v‖ + v sin‖v‖/‖v‖ (‖v‖ + eps), and scaled by Σ w_i ‖x_i‖; the base is added back.
    One model is returned unchanged (base ignored). When ‖Σ w_i u_i‖ < eps, two models are mixed
    linearly (Σ w_i x_i, plus the base); for more, mergekit raises an error and the result here is NaN
    (which `python -m hm3jax.merge` refuses as a non-finite merged tensor).
    base `[*S]` or None, models: M arrays `[*S]`, weights `[M]` -> `[*S]`.
    """
    del key
    models = list(models)
    if len(models) == 1:
        return models[0]
    shape = models[0].shape
    xs = [(x if base is None else x - base).reshape(-1) for x in models]
    w = jnp.broadcast_to(jnp.asarray(weights, xs[0].dtype), (len(xs),))
    if normalize_weights:
        w = w / jnp.sum(w)
    eps = jnp.asarray(eps, xs[0].dtype)
    norms = [jnp.linalg.norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum_models([u * w[i] for i, u in enumerate(units)])
    mean_norm = jnp.linalg.norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1, mean_norm)
    tangent = sum_models([(u - jnp.sum(u * mean) * mean) * w[i] for i, u in enumerate(units)])
    tn = jnp.linalg.norm(tangent) + eps
    out = (mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)) * sum_models([n * w[i] for i, n in enumerate(norms)])
    if len(xs) == 2:
        fallback = xs[0] * w[0] + xs[1] * w[1]
    else:
        fallback = jnp.full_like(out, jnp.nan)
    out = jnp.where(degenerate, fallback, out).reshape(shape)
    return out if base is None else out + base


multislerp = MergeMethod(
    name="multislerp", base="optional", random=False, merge_tensor=multislerp_tensor,
    params={"weight": Param(REQUIRED, per_model=True, doc="weight of each model"),
            "normalize_weights": Param(True, static=True, doc="divide the weights by their sum"),
            "eps": Param(1e-8, doc="guard added to norms")},
    doc="spherical barycentre of several models or task vectors", vmap_layers=True)


# --------------------------------------------------------------------------------------- karcher
MAX_KARCHER_ITER = 100_000  # steps of a while_loop per tensor: more would only look like a hang


def karcher_tensor(base, models: Sequence[jax.Array], weights=None, key=None, *, max_iter: int = 10,
                   tol: float = 1e-5) -> jax.Array:
    """Karcher (Riemannian) mean of the tensors' directions, scaled by their mean norm.

    Uniform weights α = 1/M. Directions u_i = θ_i/‖θ_i‖ of tensors with norm > tol are averaged on the
    unit sphere by at most `max_iter` Riemannian gradient steps (stop when the tangent norm < tol;
    terms with angle < tol are skipped); the result is (Σ α_i ‖θ_i‖) · mean direction. All norms
    <= tol give zeros; one model returns it unchanged. `base` is ignored (a recipe's base model is one
    more input). models: M arrays `[*S]` -> `[*S]`.
    """
    del base, weights, key
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or not 0 <= max_iter <= MAX_KARCHER_ITER:
        raise ValueError(f"karcher: parameter max_iter must be an integer in [0, {MAX_KARCHER_ITER}], got {max_iter!r:.40}")
    models = list(models)
    m = len(models)
    if m == 1:
        return models[0]
    shape = models[0].shape
    if models[0].dtype in LOW_PRECISION:
        return _karcher_16bit(models, max_iter, tol).reshape(shape)
    xs = [x.reshape(-1) for x in models]
    norms = jnp.stack([jnp.linalg.norm(x) for x in xs])
    units = [x / jnp.where(norms[i] == 0, 1, norms[i]) for i, x in enumerate(xs)]
    valid = norms > tol
    alpha = jnp.where(valid, 1.0 / m, 0.0)
    alpha = alpha / jnp.where(jnp.any(valid), jnp.sum(alpha), 1)
    mean = sum_models([alpha[i] * u for i, u in enumerate(units)])
    mean_norm = jnp.linalg.norm(mean)
    first = jnp.argmax(valid)
    first_valid = sum_models([jnp.where(first == i, u, 0) for i, u in enumerate(units)])
    mean = jnp.where(mean_norm < tol, first_valid, mean / jnp.where(mean_norm < tol, 1, mean_norm))

    def tangent_of(mean):
        terms = []
        for i, u in enumerate(units):
            dot = jnp.clip(jnp.vdot(u, mean), -1, 1)
            theta = jnp.arccos(dot)
            use = valid[i] & (theta >= tol)
            coef = jnp.where(use, alpha[i] * theta / jnp.where(use, jnp.sin(theta), 1), 0)
            terms.append(coef * (u - dot * mean))
        return sum_models(terms)

    def cond(state):
        i, _, done = state
        return (i < max_iter) & ~done

    def body(state):
        i, mean, _ = state
        tangent = tangent_of(mean)
        tn = jnp.linalg.norm(tangent)
        done = tn < tol
        step = jnp.cos(tn) * mean + jnp.sin(tn) * (tangent / jnp.where(done, 1, tn))
        un = jnp.linalg.norm(step)
        step = jnp.where(un > tol, step / jnp.where(un > tol, un, 1), step)
        return i + 1, jnp.where(done, mean, step), done

    _, mean, _ = lax.while_loop(cond, body, (jnp.int32(0), mean, jnp.bool_(False)))
    scale = jnp.sum(norms) / m
    out = jnp.where(jnp.any(valid), scale * mean, jnp.zeros_like(mean))
    return out.reshape(shape)


def _karcher_16bit(models: list, max_iter: int, tol: float) -> jax.Array:
    """karcher_tensor on float16/bfloat16 inputs as mergekit computes it with torch: norms in float32,
    every tensor operation rounded to the 16-bit dtype, float32 scalars (norms, cos/sin of the tangent
    norm) applied unrounded, the normalised weights computed in Python floats."""
    dt, m = models[0].dtype, len(models)
    r = rounding(dt)
    xs = [r(x.reshape(-1)) for x in models]
    norms = jnp.stack([jnp.linalg.norm(x) for x in xs])
    units = [jnp.where(norms[i] == 0, 0.0, r(true_divide(x, jnp.where(norms[i] == 0, 1, norms[i]))))
             for i, x in enumerate(xs)]
    valid = norms > tol
    # mergekit: alpha = 1/M, normalised by the sum over the k valid inputs, in Python floats
    table = np.asarray([0.0] + [(1 / m) / sum([1 / m] * k) for k in range(1, m + 1)], np.float32)
    na = jnp.asarray(table)[jnp.sum(valid)]
    mean = jnp.zeros_like(xs[0])
    for i, u in enumerate(units):
        mean = jnp.where(valid[i], r(mean + r(na * u)), mean)
    mean_norm = jnp.linalg.norm(mean)
    first = jnp.argmax(valid)
    first_valid = sum_models([jnp.where(first == i, u, 0) for i, u in enumerate(units)])
    mean = jnp.where(mean_norm < tol, first_valid, r(true_divide(mean, jnp.where(mean_norm < tol, 1, mean_norm))))

    def body(state):
        i, mean, _ = state
        tangent = jnp.zeros_like(mean)
        for j, u in enumerate(units):
            dot = jnp.clip(r(jnp.sum(mean * u)), -1, 1)
            theta = r(jnp.arccos(dot))
            use = valid[j] & (theta >= tol)
            coef = r(na * r(theta / jnp.where(use, r(jnp.sin(theta)), 1)))
            tangent = jnp.where(use, r(tangent + r(coef * r(u - r(dot * mean)))), tangent)
        tn = jnp.linalg.norm(tangent)
        done = tn < tol
        step = r(r(jnp.cos(tn) * mean) + r(jnp.sin(tn) * r(true_divide(tangent, jnp.where(done, 1, tn)))))
        un = jnp.linalg.norm(step)
        step = jnp.where(un > tol, r(true_divide(step, jnp.where(un > tol, un, 1))), step)
        return i + 1, jnp.where(done, mean, step), done

    _, mean, _ = lax.while_loop(lambda st: (st[0] < max_iter) & ~st[2], body, (jnp.int32(0), mean, jnp.bool_(False)))
    scale = sum_models([jnp.float32(1 / m) * norms[i] for i in range(m)])
    return jnp.where(jnp.any(valid), r(scale * mean), 0.0).astype(dt)


karcher = MergeMethod(
    name="karcher", base="ignored", random=False, merge_tensor=karcher_tensor, min_models=1,
    params={"max_iter": Param(10, static=True, doc="most Riemannian gradient steps"),
            "tol": Param(1e-5, doc="convergence / validity tolerance")},
    doc="Karcher mean on the unit sphere, rescaled (arXiv:2603.04972)")
