"""Generalised task arithmetic: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties),
della, della_linear — one pipeline with a choice of sparsifier and sign consensus.

Per tensor, with τ_i = θ_i − θ_base (mergekit 0.1.5 semantics):
  1. sparsify each τ_i (none / magnitude trim / random drop / outliers / DELLA), rescaled by the L1
     norm ratio when `rescale` is on;
  2. δ_i = w_i · τ̂_i;
  3. with a sign consensus: s = sign(Σ_i δ_i) ("sum", zero -> +1) or the sign of the count of
     positive minus negative δ_i ("count"); keep δ_i where sign(δ_i) == s (zeros never count);
     Δ = Σ δ_i m_i, divisor Σ w_i m_i (0 -> 1). Without: Δ = Σ δ_i, divisor Σ w_i (|.| < 1e-8 -> 1);
  4. Δ /= divisor when `normalize`; output θ_base + λ·Δ.

Given float16/bfloat16 inputs the arithmetic is mergekit's, which runs it in that dtype with torch's
CPU kernels: each operation is computed in float32 and rounded to the 16-bit dtype, sums over the
models (sign election, Σ δ_i, Σ w_i) accumulate in float32 and round once, the weights are rounded to
the 16-bit dtype, λ is not; the L1 rescale of the random drops runs in float32 for float16 (torch has
no float16 Bernoulli on CPU) and in bfloat16 for bfloat16. Cast float16/bfloat16 inputs to float32 for
float32 arithmetic (`python -m hm3jax.merge --compute-dtype float32`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from hm3jax.merging import sparsify as sp
from hm3jax.merging.base import REQUIRED, MergeMethod, Param, sum_models

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
CONSENSUS = (None, "sum", "count")
RANDOM_SPARSIFIERS = ("random", "della_magprune")  # the ones that draw keep-masks (key or masks)
LOW_PRECISION = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def round_to(x: jax.Array, dtype) -> jax.Array:
    """float32 `x` rounded to the float16/bfloat16 grid (to nearest even), kept in float32.

    Not a convert pair: XLA narrows chains of converts around float32 ops into 16-bit ops, which
    XLA:CPU then evaluates with float32 excess precision (not rounding in between). reduce_precision
    stays, but flushes float16 subnormals, so those (|x| < 2^-14) are rounded to multiples of 2^-24.
    """
    x = jnp.asarray(x, jnp.float32)
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    tiny = jnp.abs(x) < 2.0 ** -14
    return jnp.where(tiny, jnp.round(x * 2.0 ** 24) * 2.0 ** -24, lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10))


def rounding(dtype):
    """For float16/bfloat16: v -> v rounded to `dtype`, held in float32 (one torch CPU op on 16-bit
    tensors: computed in float32, rounded; see round_to); the identity for other dtypes."""
    if np.dtype(dtype) in LOW_PRECISION:
        return lambda v: round_to(v, dtype)
    return lambda v: v


def true_divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """x / d, also for a scalar d: XLA rewrites a division by a broadcast scalar into a multiplication
    by its reciprocal (up to 1 ulp off); a divisor that depends on x elementwise stays a division, as
    in torch (a non-finite x gives NaN instead of ±Inf; either is refused as non-finite)."""
    return x / (d + x * 0)


def _sparsify_one(kind: str, delta, p: dict, key, mask, rescale: bool, trim: str):
    norm = "l1" if rescale else None
    if kind == "magnitude":
        return sp.magnitude(delta, p["density"], k=p.get("keep"), rescale_norm=norm, method=trim)
    if kind == "magnitude_outliers":
        counts = (p["keep"], p["top"]) if "keep" in p else None
        return sp.magnitude_outliers(delta, p["density"], p["gamma"], counts=counts, rescale_norm=norm)
    if kind == "random":
        return sp.random_drop(delta, p["density"], key, mask=mask, rescale_norm=norm)
    if kind == "della_magprune":
        return sp.della_drop(delta, p["density"], p["epsilon"], key, mask=mask, rescale_norm=norm)
    raise ValueError(f"sparsification {kind!r} is not supported; supported: {SPARSIFIERS[1:]}")


def consensus_mask(deltas: Sequence[jax.Array], method: str = "sum") -> list[jax.Array]:
    """TIES sign election over weighted deltas (M arrays, or one `[M, *S]` array).

    "sum": elected sign of Σ_i δ_i; "count": sign of Σ_i sign(δ_i). Ties (0) elect +1; zero entries
    (trimmed or unchanged) never agree. Returns M bool arrays: True where δ_i agrees.
    """
    deltas = list(deltas)
    signs = [jnp.sign(d) for d in deltas]
    if method == "sum":
        total = sum_models(deltas)
    elif method == "count":
        total = sum_models(signs)
    else:
        raise ValueError(f"consensus {method!r} is not supported; supported: sum, count")
    elected = jnp.where(total >= 0, 1, -1).astype(deltas[0].dtype)
    return [s == elected for s in signs]


def generalized_task_arithmetic(base: jax.Array, models: Sequence[jax.Array], weights: jax.Array,
                                key: jax.Array | None = None, *, masks: Sequence[jax.Array] | None = None,
                                sparsification: str | None = None, consensus: str | None = None,
                                normalize: bool = False, rescale: bool = False, trim: str = "exact",
                                int8_mask: bool = False, **params: Any) -> jax.Array:
    """One tensor through the task-arithmetic pipeline (module docstring).

    Args:
      base: `[*S]`; models: M arrays `[*S]` (a sequence, or one stacked `[M, *S]` array); weights `[M]`.
      key: PRNG key for random sparsifiers (split into one key per model), or `masks`: M bool arrays.
      sparsification / consensus: see SPARSIFIERS / CONSENSUS.
      normalize, rescale: as in mergekit (rescale = L1 norm-ratio rescale after sparsifying).
      trim: "exact" (exact top-k via radix select) or "search" (bisection threshold; partitions over
        sharded tensors); see sparsify.topk_mask.
      int8_mask: accepted for mergekit recipes; no effect (masks are booleans here).
      params: `lambda` (scalar), `density` `[M]`, and as the sparsifier needs `gamma` `[M]`,
        `epsilon` `[M]`, host-computed counts `keep`/`top` `[M]`.
    Returns the merged tensor `[*S]`.
    """
    del int8_mask
    if base.dtype in LOW_PRECISION:
        return _gta_16bit(base, models, weights, key, masks, sparsification, consensus, normalize, rescale,
                          trim, params)
    # Models stay separate arrays: stacking them would materialise an M-times copy (XLA:CPU does
    # not fuse the concatenation into the elementwise work), and the per-model loop is unrolled.
    deltas = [m - base for m in models]
    m = len(deltas)
    w = jnp.broadcast_to(jnp.asarray(weights, base.dtype), (m,))
    if sparsification is not None:
        per, keys, mks = _per_model_sparsify_args(sparsification, params, m, key, masks)
        deltas = [_sparsify_one(sparsification, d, per[i], keys[i], mks[i], rescale, trim)
                  for i, d in enumerate(deltas)]
    deltas = [w[i] * d for i, d in enumerate(deltas)]
    if consensus is not None:
        agree = consensus_mask(deltas, consensus)
        mixed = sum_models([jnp.where(a, d, 0) for a, d in zip(agree, deltas)])
        divisor = sum_models([jnp.where(a, w[i], 0) for i, a in enumerate(agree)])
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = sum_models(deltas)
        divisor = jnp.sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * jnp.asarray(params.get("lambda", 1.0), mixed.dtype)
    return (base + mixed).astype(base.dtype)


def _per_model_sparsify_args(sparsification, params, m: int, key, masks):
    """Per model i: its sparsifier parameters, PRNG key (random sparsifiers) and injected mask."""
    per = {k: jnp.broadcast_to(jnp.asarray(params[k]), (m,))
           for k in ("density", "gamma", "epsilon", "keep", "top") if k in params}
    random = sparsification in RANDOM_SPARSIFIERS
    if random and masks is None and key is None:
        raise ValueError(f"sparsification {sparsification!r} needs a PRNG key or masks")
    keys = jax.random.split(key, m) if (random and masks is None) else [None] * m
    mks = [None] * m if masks is None else list(masks)
    return [{k: v[i] for k, v in per.items()} for i in range(m)], keys, mks


def _gta_16bit(base, models, weights, key, masks, sparsification, consensus, normalize, rescale, trim, params):
    """The pipeline in float16/bfloat16 as mergekit computes it with torch (module docstring)."""
    dt, f32 = base.dtype, jnp.float32

    r = rounding(dt)  # one torch CPU op: computed in float32, rounded to the 16-bit dtype

    b = base.astype(f32)
    deltas = [r(x.astype(f32) - b) for x in models]
    m = len(deltas)
    if sparsification is not None:
        random = sparsification in RANDOM_SPARSIFIERS
        per, keys, mks = _per_model_sparsify_args(sparsification, params, m, key, masks)
        out = []
        for i, d in enumerate(deltas):
            kept = _sparsify_one(sparsification, d, per[i], keys[i], mks[i], False, trim)
            if rescale:  # L1 norm ratio; float32 work for float16 random drops (mergekit's CPU fallback)
                work32 = random and dt == np.dtype(np.float16)
                before, after = jnp.sum(jnp.abs(d)), jnp.sum(jnp.abs(kept))
                if work32:
                    ok = (before >= 1e-7) & (after >= 1e-7)
                    kept = r(jnp.where(ok, kept * (before / jnp.where(ok, after, 1)), kept))
                else:
                    before, after, eps = r(before), r(after), r(jnp.float32(1e-7))
                    ok = (before >= eps) & (after >= eps)
                    kept = jnp.where(ok, r(kept * r(before / jnp.where(ok, after, 1))), kept)
            out.append(kept)
        deltas = out
    w = r(jnp.broadcast_to(jnp.asarray(weights, f32), (m,)))
    deltas = [r(w[i] * d) for i, d in enumerate(deltas)]
    if consensus is not None:
        signs = [jnp.sign(d) for d in deltas]
        total = r(sum_models(deltas if consensus == "sum" else signs))
        elected = jnp.where(total >= 0, 1.0, -1.0)
        agree = [s == elected for s in signs]
        mixed = r(sum_models([jnp.where(a, d, 0.0) for a, d in zip(agree, deltas)]))
        divisor = r(sum_models([jnp.where(a, w[i], 0.0) for i, a in enumerate(agree)]))
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = r(sum_models(deltas))
        divisor = r(sum_models([w[i] for i in range(m)]))
        divisor = jnp.where(jnp.abs(divisor) < r(jnp.float32(1e-8)), 1.0, divisor)  # 1e-8 rounds to 0 in float16
    if normalize:
        mixed = r(true_divide(mixed, divisor))
    mixed = r(mixed * jnp.asarray(params.get("lambda", 1.0), f32))
    return (b + mixed).astype(dt)


def _prepare_counts(kind: str | None):
    """Host hook: exact float64 keep-counts for the magnitude-ranked trims (see sparsify.keep_count)."""
    def prepare(params: dict, shape: tuple) -> dict:
        n = 1
        for d in shape:
            n *= d
        if kind == "magnitude":
            params["keep"] = sp.keep_count(params["density"], n)
        elif kind == "magnitude_outliers":
            params["keep"], params["top"] = sp.outlier_counts(params["density"], params["gamma"], n)
        return params
    return prepare if kind in ("magnitude", "magnitude_outliers") else None


def make_task_arithmetic(name: str, *, sparsification: str | None, consensus: str | None,
                         default_normalize: bool, default_rescale: bool, doc: str = "") -> MergeMethod:
    """Construct a task-arithmetic-family method (the same parameters and defaults as mergekit)."""
    if sparsification not in SPARSIFIERS or consensus not in CONSENSUS:
        raise ValueError(f"sparsification must be one of {SPARSIFIERS}, consensus one of {CONSENSUS}")
    params = {
        "weight": Param(REQUIRED, per_model=True, doc="coefficient of each task vector"),
        "density": Param(1.0, per_model=True, doc="fraction of each task vector kept, in (0, 1]"),
        "normalize": Param(default_normalize, static=True, doc="divide by the sum of (agreeing) weights"),
        "rescale": Param(default_rescale, static=True, doc="L1 norm-ratio rescale after sparsifying"),
        "lambda": Param(1.0, doc="scale of the merged task vector"),
        "int8_mask": Param(False, static=True, doc="mergekit memory option; no effect"),
    }
    if sparsification == "magnitude":
        params["trim"] = Param("exact", static=True, doc="'exact' top-k or 'search' (threshold; shardable)")
    if sparsification == "magnitude_outliers":
        params["gamma"] = Param(0.01, per_model=True, doc="fraction of largest entries dropped")
    if sparsification == "della_magprune":
        params["epsilon"] = Param(0.15, per_model=True, doc="spread of the rank-based keep probability")

    def merge_tensor(base, models, weights, key=None, **kw):
        return generalized_task_arithmetic(base, models, weights, key, sparsification=sparsification,
                                           consensus=consensus, **kw)

    random = sparsification in RANDOM_SPARSIFIERS
    # Magnitude trims branch on the data (tie-breaking); the others are one fused pass over a leaf.
    branchless = sparsification in (None, "random")
    return MergeMethod(name=name, params=params, base="required", random=random,
                       merge_tensor=merge_tensor, prepare=_prepare_counts(sparsification), doc=doc,
                       vmap_layers=branchless)


task_arithmetic = make_task_arithmetic(
    "task_arithmetic", sparsification=None, consensus=None, default_normalize=False,
    default_rescale=False, doc="Σ w_i τ_i added to the base (arXiv:2212.04089)")
ties = make_task_arithmetic(
    "ties", sparsification="magnitude", consensus="sum", default_normalize=True, default_rescale=False,
    doc="magnitude trim + sign election + disjoint mean (arXiv:2306.01708)")
dare_ties = make_task_arithmetic(
    "dare_ties", sparsification="random", consensus="sum", default_normalize=False, default_rescale=True,
    doc="random drop with rescale + sign election (arXiv:2311.03099)")
dare_linear = make_task_arithmetic(
    "dare_linear", sparsification="random", consensus=None, default_normalize=False, default_rescale=True,
    doc="random drop with rescale, then task arithmetic (arXiv:2311.03099)")
breadcrumbs = make_task_arithmetic(
    "breadcrumbs", sparsification="magnitude_outliers", consensus=None, default_normalize=False,
    default_rescale=False, doc="drop outliers and small entries (arXiv:2312.06795)")
breadcrumbs_ties = make_task_arithmetic(
    "breadcrumbs_ties", sparsification="magnitude_outliers", consensus="sum", default_normalize=False,
    default_rescale=False, doc="breadcrumbs + sign election (arXiv:2312.06795)")
della = make_task_arithmetic(
    "della", sparsification="della_magprune", consensus="sum", default_normalize=True, default_rescale=True,
    doc="magnitude-ranked random drop + sign election (arXiv:2406.11617)")
della_linear = make_task_arithmetic(
    "della_linear", sparsification="della_magprune", consensus=None, default_normalize=False,
    default_rescale=True, doc="magnitude-ranked random drop, then task arithmetic (arXiv:2406.11617)")

METHODS = (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)
