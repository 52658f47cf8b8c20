"""Sparsifiers for task vectors (τ = θ_model − θ_base): trims, random drops and their rescaling.

Every function works on one tensor, is pure, and jits and vmaps (densities, counts and keys may be
traced). Counts of kept entries follow mergekit 0.1.5 exactly (Python `int(fraction * numel)`, i.e.
floor in float64); pass them precomputed with `keep_count` on the host (`k=` / `counts=`) for exact
parity on large tensors, since a float32 product inside a jit can be off by one above ~2^24 entries.

Random sparsifiers take either a PRNG `key` or an injected boolean `mask` (same shape as the tensor),
so results can be compared with another implementation given the same mask. Their masks come from
`uniform_hash`, a keyed hash of each entry's index: no random stream is carried, so a tensor sharded
over devices draws the same mask as the whole tensor, at about a tenth of threefry's cost.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

RESCALE_NORMS = ("l1", "l2", "linf")
TRIM_METHODS = ("exact", "search", "sort")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


_GOLDEN = 0x9E3779B9  # odd: multiplying by it is a bijection of uint32


def _fmix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips about half
    # of the output bits.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_hash(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 values in [0, 1) on a 2^-24 grid, one per entry of `shape`, from a keyed hash.

    Entry i (row-major flat index) gets fmix32(... fmix32(i · φ ^ w_0) ... ^ w_last) of the key's
    words w (two for threefry keys), top 24 bits. Each round is a bijection, so within one tensor no
    two entries share a hash. The index is built from per-dimension iotas, which XLA computes shard
    by shard, so a sharded tensor gets exactly the unsharded values. Works with typed and raw keys,
    under jit and vmap.

    Raises:
      ValueError: the tensor has 2^32 entries or more (the index is 32-bit).
    """
    n = int(np.prod(shape, dtype=np.int64))
    if n >= 2**32:
        raise ValueError(f"uniform_hash: a tensor of shape {tuple(shape)} has {n} entries; at most "
                         "2^32 - 1 are supported")
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
        stride *= shape[d]
    h = idx * jnp.uint32(_GOLDEN)
    for j in range(words.shape[0]):
        h = _fmix32(h ^ words[j])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def keep_count(fraction: Any, n: int) -> Any:
    """floor(fraction · n) as mergekit computes it (`int(density * numel)`).

    Exact (float64 on the host) when `fraction` is concrete: returns an int32 numpy array of the same
    shape as `fraction`. Under a trace it is computed in float32 (exact for n < 2^24 unless
    fraction · n lands within float32 rounding of an integer).
    """
    if _is_concrete(fraction):
        f = np.asarray(fraction, dtype=np.float64)
        return np.floor(f * n).astype(np.int32)
    return jnp.floor(jnp.asarray(fraction, jnp.float32) * n).astype(jnp.int32)


# ------------------------------------------------------------------------------------- top-k masks
def _kth_largest_sort(a: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th largest value of a flat non-negative array (k >= 1), by a full sort."""
    s = jnp.sort(a)
    return s[jnp.clip(a.size - k, 0, a.size - 1)]


def _kth_largest_radix(a: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th largest value of a flat non-negative float32 array (k >= 1), by radix select.

    Non-negative IEEE floats order like their bit patterns, so two histogram passes find it exactly:
    one over the high 16 bits picks the bucket holding the k-th largest, one over the low 16 bits of
    that bucket's entries picks the value. Two memory-bound passes instead of an O(n log n) sort.
    """
    bits = lax.bitcast_convert_type(a, jnp.uint32)
    hi = (bits >> 16).astype(jnp.int32)
    ge = jnp.cumsum(jnp.bincount(hi, length=1 << 16)[::-1])[::-1]  # ge[p] = count(hi >= p)
    p = jnp.sum(ge >= k) - 1
    above = jnp.where(p < (1 << 16) - 1, ge[jnp.minimum(p + 1, (1 << 16) - 1)], 0)
    low = jnp.where(hi == p, (bits & 0xFFFF).astype(jnp.int32), 1 << 16)  # others to a spare bin
    ge_low = jnp.cumsum(jnp.bincount(low, length=(1 << 16) + 1)[:1 << 16][::-1])[::-1]
    q = jnp.sum(ge_low >= k - above) - 1
    return lax.bitcast_convert_type(((p << 16) | q).astype(jnp.uint32), jnp.float32)


def _kth_largest_search(a: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th largest value of a flat non-negative float32 array (k >= 1), by bisection.

    Non-negative IEEE floats order like their bit patterns read as int32, so a bisection over
    the integers [0, bits(max)] finds the exact k-th largest value in at most 32 passes, each a
    compare-and-count. Counting is a plain reduction, so on a sharded array it partitions into
    per-shard counts plus one all-reduce per pass, with no sort and no gather.
    """
    bits = lambda t: lax.bitcast_convert_type(t, jnp.int32)
    value = lambda b: lax.bitcast_convert_type(b, jnp.float32)
    lo = jnp.int32(0)  # count(a >= 0) = n >= k always holds
    hi = bits(jnp.max(a)) + 1  # count(a >= next float above max) = 0 < k

    def body(_, state):
        lo, hi = state
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(a >= value(mid), dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    return value(lo)


def topk_mask(x: jax.Array, k: Any, method: str = "exact", zero_ties_free: bool = False) -> jax.Array:
    """Boolean mask of the `k` entries of largest |x|.

    Args:
      x: any-shaped array.
      k: number of entries to keep (int or traced int scalar); <= 0 keeps none, >= numel keeps all.
      method: "exact" keeps exactly k entries, ties at the k-th magnitude broken by flat index (lowest
        first; mergekit's torch.argsort leaves that order unspecified); the k-th magnitude comes from
        a two-pass radix select. "sort" is the same mask from a full sort (slower; a reference).
        "search" finds the k-th magnitude by bisection (32 compare-and-count passes that partition
        over a sharded array) and keeps every entry with |x| >= it: the same set unless several
        non-zero entries tie at the k-th magnitude (ties at zero change no result, since a kept
        zero contributes nothing and has no sign).
      zero_ties_free: when the k-th magnitude is 0, keep every zero instead of exactly enough of them
        (numerically the same for every trim here, and skips a prefix sum).
    Returns a bool array shaped like x.
    """
    if method not in TRIM_METHODS:
        raise ValueError(f"trim method {method!r} is not supported; supported: {', '.join(TRIM_METHODS)}")
    a = jnp.abs(x).astype(jnp.float32).reshape(-1)
    k = jnp.asarray(k, jnp.int32)
    if method == "search":
        kth = _kth_largest_search(a, jnp.clip(k, 1, a.size))
        mask = a >= kth
    else:
        select = _kth_largest_sort if method == "sort" else _kth_largest_radix
        kth = select(a, jnp.clip(k, 1, a.size))
        above = a > kth
        tied = a == kth
        need = k - jnp.sum(above, dtype=jnp.int32)

        def break_ties():
            return above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= need))

        if method == "sort":
            mask = break_ties()
        else:
            # The prefix sum is slow on CPU and only matters when some, not all, of the entries tied
            # at the k-th magnitude are kept (and, with zero_ties_free, that magnitude is not 0).
            partial = jnp.sum(tied, dtype=jnp.int32) > need
            if zero_ties_free:
                partial = partial & (kth > 0)
            mask = lax.cond(partial, break_ties, lambda: a >= kth)
    mask = jnp.where(k <= 0, False, mask)
    return mask.reshape(x.shape)


# ------------------------------------------------------------------------------------- rescaling
def rescale_masked(x: jax.Array, mask: jax.Array, norm: str | None, eps: float = 1e-7) -> jax.Array:
    """x ⊙ mask, rescaled so its `norm` ("l1", "l2", "linf") matches that of x.

    As in mergekit, no rescale happens when either norm is below `eps` (avoids 0/0 and blow-ups).
    `norm=None` returns the masked tensor unchanged.
    """
    masked = jnp.where(mask, x, jnp.zeros_like(x))
    if norm is None:
        return masked
    if norm == "l1":
        before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
    elif norm == "l2":
        before, after = jnp.linalg.norm(x.reshape(-1)), jnp.linalg.norm(masked.reshape(-1))
    elif norm == "linf":
        before, after = jnp.max(jnp.abs(x)), jnp.max(jnp.abs(masked))
    else:
        raise ValueError(f"rescale norm {norm!r} is not supported; supported: {', '.join(RESCALE_NORMS)}")
    ok = (before >= eps) & (after >= eps)
    scale = jnp.where(ok, before / jnp.where(ok, after, 1), 1).astype(x.dtype)
    return masked * scale


# ------------------------------------------------------------------------------------- sparsifiers
def magnitude(x: jax.Array, density: Any, *, k: Any = None, rescale_norm: str | None = None,
              method: str = "exact") -> jax.Array:
    """TIES trim: keep the max(1, int(density · numel)) largest-magnitude entries, zero the rest.

    mergekit semantics: density >= 1 returns x untouched (no rescale); density <= 0 returns zeros;
    otherwise at least one entry is kept. `k` overrides the count (use `keep_count` on the host).
    Shapes: x any; density scalar. Returns an array shaped like x.
    """
    if k is None:
        k = keep_count(density, x.size)  # before any float32 cast: exact on concrete values
    density = jnp.asarray(density, jnp.float32)
    k = jnp.maximum(jnp.asarray(k, jnp.int32), 1)
    out = rescale_masked(x, topk_mask(x, k, method, zero_ties_free=True), rescale_norm)
    out = jnp.where(density <= 0, jnp.zeros_like(x), out)
    return jnp.where(density >= 1, x, out)


def outlier_counts(density: Any, gamma: Any, n: int) -> tuple[Any, Any]:
    """(kept, dropped-from-top) counts of `magnitude_outliers` for a tensor of n entries.

    kept = int(density·n); top = min(int(gamma·n), n − kept): the outlier cut shrinks when needed to
    keep the target density (mergekit's n_bot = max(0, n − kept − top)).
    """
    kept = keep_count(density, n)
    top = keep_count(gamma, n)
    xp = np if _is_concrete(kept) and _is_concrete(top) else jnp
    return kept, xp.minimum(top, n - kept)


def magnitude_outliers(x: jax.Array, density: Any, gamma: Any = 0.01, *, counts: Any = None,
                       rescale_norm: str | None = None) -> jax.Array:
    """Model Breadcrumbs: drop the top `gamma` fraction by magnitude, then the smallest entries, so
    that int(density · numel) entries remain.

    Ranks follow mergekit 0.1.5 (entries sorted by |x|, keep sorted positions [n_bot, n_bot + kept)).
    With int(gamma · numel) == 0 this keeps the `kept` largest entries; mergekit before 0.1 sliced
    `[n_bot:-n_top]`, which keeps nothing when n_top is 0; that behaviour is not reproduced.
    density >= 1 returns x untouched. `counts=(kept, top)` overrides the counts (see
    `outlier_counts`). Ties broken by flat index.
    """
    kept, top = outlier_counts(density, gamma, x.size) if counts is None else counts
    density = jnp.asarray(density, jnp.float32)
    kept, top = jnp.asarray(kept, jnp.int32), jnp.asarray(top, jnp.int32)
    # Keep the (top + kept) largest minus the top largest: the same total order for both masks, so
    # the sets are nested and exactly `kept` entries remain.
    mask = topk_mask(x, top + kept, zero_ties_free=True) & ~topk_mask(x, top, zero_ties_free=True)
    return jnp.where(density >= 1, x, rescale_masked(x, mask, rescale_norm))


def random_drop(x: jax.Array, density: Any, key: jax.Array | None = None, *, mask: jax.Array | None = None,
                rescale_norm: str | None = None) -> jax.Array:
    """DARE: keep each entry independently with probability `density`, then rescale.

    mergekit >= 0.1 rescales by the norm ratio (`rescale_norm="l1"`, its default for DARE) instead of
    the paper's 1/density. density >= 1 returns x untouched. Give either `key` or an injected boolean
    `mask` shaped like x (True = keep).
    """
    density = jnp.asarray(density, jnp.float32)
    if mask is None:
        if key is None:
            raise ValueError("random_drop needs a PRNG key or an injected mask")
        mask = uniform_hash(key, x.shape) < jnp.clip(density, 0.0, 1.0)
    return jnp.where(density >= 1, x, rescale_masked(x, mask.astype(bool), rescale_norm))


def della_probs(x: jax.Array, density: Any, epsilon: Any) -> jax.Array:
    """DELLA keep probabilities: per row, (density − ε) + 2ε · rank/(n − 1), rank 0 = smallest |x|.

    Rows as in mergekit: a tensor with fewer than 2 dims is one row; otherwise ranks run along axis 1.
    Ties ranked by index (torch leaves that order unspecified). A single-entry row gets density − ε
    (mergekit divides 0 by 0 there). Returns float32 probabilities shaped like x.
    """
    a = jnp.abs(x).astype(jnp.float32)
    rows = a[None] if a.ndim < 2 else jnp.moveaxis(a, 1, -1)
    n = rows.shape[-1]
    ranks = jnp.argsort(jnp.argsort(rows, axis=-1, stable=True), axis=-1).astype(jnp.float32)
    rank_norm = ranks / (n - 1) if n > 1 else jnp.zeros_like(ranks)
    density = jnp.asarray(density, jnp.float32)
    epsilon = jnp.asarray(epsilon, jnp.float32)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs[0] if a.ndim < 2 else jnp.moveaxis(probs, -1, 1)


def della_drop(x: jax.Array, density: Any, epsilon: Any = 0.15, key: jax.Array | None = None, *,
               mask: jax.Array | None = None, rescale_norm: str | None = None) -> jax.Array:
    """DELLA MagPrune: keep entries with magnitude-ranked probabilities (`della_probs`), then rescale.

    mergekit rescales by the norm ratio (`rescale_norm="l1"` by default for DELLA), not the paper's
    per-entry 1/p. density >= 1 returns x; density <= 0 returns zeros; density ± epsilon must lie in
    (0, 1) (checked by the recipe layer, since here the values may be traced). Give `key` or `mask`.
    """
    density = jnp.asarray(density, jnp.float32)
    if mask is None:
        if key is None:
            raise ValueError("della_drop needs a PRNG key or an injected mask")
        mask = uniform_hash(key, x.shape) < jnp.clip(della_probs(x, density, epsilon), 0.0, 1.0)
    out = rescale_masked(x, mask.astype(bool), rescale_norm)
    out = jnp.where(density <= 0, jnp.zeros_like(x), out)
    return jnp.where(density >= 1, x, out)
