"""Per-tensor merge methods and sparsifiers: random methods against mergekit's own functions with
injected masks, statistics of the random drops, trims, and the pytree API (vmap, jit, keys)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax import merging
from hm3jax.merging import METHODS
from hm3jax.merging import sparsify as sp

torch = pytest.importorskip("torch")
mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SHAPE = (24, 40)


def _data(m=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=SHAPE).astype(np.float32)
    models = base + 0.05 * rng.normal(size=(m,) + SHAPE).astype(np.float32)
    same = rng.random(SHAPE) < 0.1
    models[:, same] = base[same]  # some untouched entries: zero task-vector entries
    return base, models


def _mergekit(name, base, models, params, masks):
    """mergekit's method on one tensor, with torch.bernoulli replaced by the given masks in order."""
    drawn, it = [], iter(masks)
    real = torch.bernoulli

    def fake(p, *a, **k):
        drawn.append(p.clone())
        return torch.from_numpy(next(it).astype(np.float32)).to(p.dtype)

    torch.bernoulli = fake
    try:
        group = TensorGroup.from_tensors([torch.from_numpy(base)] + [torch.from_numpy(m) for m in models],
                                         base_index=0)
        (out,) = mergekit_methods.get(name)((group,), parameters=params)
    finally:
        torch.bernoulli = real
    return out.numpy(), drawn


@pytest.mark.parametrize("name,params", [
    ("dare_ties", {"density": [0.3, 0.5, 0.7]}),
    ("dare_linear", {"density": [0.4, 0.4, 0.9], "normalize": True}),
    ("della", {"density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.3]}),
    ("della_linear", {"density": [0.5, 0.5, 0.5], "rescale": False}),
])
def test_random_methods_match_mergekit_with_injected_masks(name, params):
    base, models = _data()
    w = np.array([0.6, 0.3, 0.9], np.float32)
    rng = np.random.default_rng(5)
    masks = rng.random((3,) + SHAPE) < 0.5
    ref, drawn = _mergekit(name, base, models, {"weight": list(w), **params}, masks)
    method = METHODS[name]
    kw = {k: v for k, v in method.resolve(params, weights_given=True).items() if k != "weight"}
    got = method.merge_tensor(jnp.asarray(base), jnp.asarray(models), jnp.asarray(w), None,
                              masks=jnp.asarray(masks), **kw)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)
    if name.startswith("della"):  # the keep probabilities mergekit drew from
        eps = params.get("epsilon", [0.15] * 3)
        for i in range(3):
            tau = models[i] - base
            probs = np.asarray(sp.della_probs(jnp.asarray(tau), params["density"][i], eps[i]))
            # Entries tied at zero are ranked in an unspecified order by torch; the others must agree.
            np.testing.assert_allclose(probs[tau != 0], drawn[i].numpy()[tau != 0], atol=1e-6)


def test_random_drop_statistics():
    x = jax.random.normal(jax.random.PRNGKey(0), (200_000,))
    for density in (0.1, 0.5, 0.9):
        y = sp.random_drop(x, density, jax.random.PRNGKey(1), rescale_norm="l1")
        kept = float(jnp.mean(y != 0))
        assert abs(kept - density) < 0.01
        # L1 rescale: the kept entries carry the whole L1 norm (mergekit >= 0.1; not 1/density).
        np.testing.assert_allclose(float(jnp.sum(jnp.abs(y))), float(jnp.sum(jnp.abs(x))), rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(y != 0), np.asarray(jnp.where(y != 0, x, 0) != 0))
    z = sp.random_drop(x, 0.5, jax.random.PRNGKey(1))
    assert set(np.unique(np.asarray(z[z != 0] / x[z != 0]))) == {1.0}  # no rescale by default


def test_uniform_hash_is_uniform_independent_and_keyed():
    """The keep-masks' source: uniform, no structure along rows or columns, a new draw per key."""
    key = jax.random.PRNGKey(5)
    u = np.asarray(sp.uniform_hash(key, (512, 1024)))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    expected = u.size / 64
    assert ((counts - expected) ** 2 / expected).sum() < 120  # chi-square, 63 dof: p ~ 1e-5
    m = u < 0.3
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:])):  # neighbours along each axis
        assert abs((a & b).mean() - 0.09) < 0.003
    for other in (jax.random.PRNGKey(6), jax.random.split(key)[0]):
        m2 = np.asarray(sp.uniform_hash(other, (512, 1024))) < 0.3
        assert abs((m & m2).mean() - 0.09) < 0.003
    # A typed key and its raw words, jit and vmap over keys all give the same values.
    np.testing.assert_array_equal(np.asarray(sp.uniform_hash(jax.random.wrap_key_data(key), (512, 1024))), u)
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(lambda k: sp.uniform_hash(k, (7, 9))))(keys)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(sp.uniform_hash(keys[i], (7, 9))))
    assert sp.uniform_hash(key, (0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match="2\\^32"):
        sp.uniform_hash(key, (2**16, 2**16))


def test_della_statistics_follow_ranks():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4096))
    keys = jax.random.split(jax.random.PRNGKey(2), 8)
    kept = jnp.stack([sp.della_drop(x, 0.5, 0.2, k) != 0 for k in keys]).mean(axis=0)
    order = jnp.argsort(jnp.abs(x), axis=1)
    by_rank = jnp.take_along_axis(kept, order, axis=1).mean(axis=0)  # keep rate by magnitude rank
    assert abs(float(by_rank[:400].mean()) - 0.31) < 0.02  # smallest: ~ density - eps
    assert abs(float(by_rank[-400:].mean()) - 0.69) < 0.02  # largest: ~ density + eps
    assert abs(float(kept.mean()) - 0.5) < 0.01


def test_magnitude_trims_match_mergekit_and_search():
    from mergekit.sparsify import magnitude, magnitude_outliers

    # Counts are traced arguments: one compilation per function, not per density.
    trim = jax.jit(lambda x, d, k, method: sp.magnitude(x, d, k=k, method=method), static_argnums=3)
    topk = jax.jit(sp.topk_mask, static_argnums=2)
    crumbs = jax.jit(lambda x, d, kept, top: sp.magnitude_outliers(x, d, counts=(kept, top)))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(33, 47)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0  # ties at zero
    for d in (0.01, 0.3, 0.7, 0.99):
        ref = magnitude(torch.from_numpy(x), d).numpy()
        np.testing.assert_array_equal(trim(x, d, sp.keep_count(d, x.size), "exact"), ref)
        # The threshold search keeps every entry tied at the k-th magnitude; ties here are at zero.
        np.testing.assert_array_equal(trim(x, d, sp.keep_count(d, x.size), "search"), ref)
        assert np.count_nonzero(topk(x, int(d * x.size), "exact")) == int(d * x.size)
    # Heavy ties at non-zero magnitudes (coarsely quantised values): radix select == full sort.
    q = jnp.asarray(np.round(x * 4) / 4)
    for k in (0, 1, 17, 700, 1000, q.size, q.size + 5):
        np.testing.assert_array_equal(topk(q, k, "exact"), topk(q, k, "sort"))
        assert int(topk(q, k, "exact").sum()) == min(k, q.size)
    for d, g in ((0.6, 0.05), (0.9, 0.2), (0.5, 0.0001)):  # the last: int(gamma * numel) == 0
        ref = magnitude_outliers(torch.from_numpy(x), d, gamma=g).numpy()
        np.testing.assert_array_equal(crumbs(x, d, *sp.outlier_counts(d, g, x.size)), ref)


def test_keep_count_is_exact_for_host_values():
    # float32(0.3) * n rounds the other way from Python's int(0.3 * n) at this size.
    n = 4096 * 4096
    assert int(sp.keep_count(0.3, n)) == int(0.3 * n)
    assert int(sp.keep_count(np.float64(0.7), 10)) == int(0.7 * 10)


def _params(seed, L=3):
    # Two leaves (one plain, one layer-stacked): every distinct leaf shape costs a compilation.
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return {"embed_tokens": {"weight": jax.random.normal(k[0], (16, 8))},
            "layers": {"mlp": {"up_proj": {"weight": jax.random.normal(k[1], (L, 12, 8))}}}}


def test_pytree_merge_is_per_layer_and_vmaps_over_weights():
    base = _params(0)
    models = [jax.tree.map(lambda a, b: a + 0.1 * b, base, _params(i)) for i in (1, 2, 3)]
    W = jax.random.uniform(jax.random.PRNGKey(9), (8, 3))
    batched = jax.vmap(lambda w: merging.ties(base, models, w, density=0.4))(W)
    for i in range(8):
        one = merging.ties(base, models, W[i], density=0.4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-6), batched, one)
    # Layer l of a stacked leaf equals the per-tensor merge of layer l alone (top-k per layer).
    up = lambda t: t["layers"]["mlp"]["up_proj"]["weight"]
    ms = jnp.stack([up(m)[1] for m in models])
    ref = jax.jit(METHODS["ties"].merge_tensor, static_argnames="normalize")(
        up(base)[1], ms, W[0], None, density=0.4, normalize=True, keep=sp.keep_count(0.4, 96))
    np.testing.assert_allclose(up(merging.ties(base, models, W[0], density=0.4))[1], ref, atol=1e-6)


def test_per_tensor_and_per_layer_parameters():
    base = _params(0)
    models = [jax.tree.map(lambda a, b: a + 0.1 * b, base, _params(i)) for i in (1, 2)]
    w = jnp.array([0.5, 0.5])
    dens = jax.tree.map(lambda _: 1.0, base)
    dens["layers"]["mlp"]["up_proj"]["weight"] = jnp.array([[1.0, 1.0], [0.2, 0.2], [1.0, 0.5]])
    out = merging.ties(base, models, w, density=dens)
    full = merging.ties(base, models, w, density=1.0)
    up = lambda t: t["layers"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_allclose(up(out)[0], up(full)[0], atol=1e-6)
    assert not np.allclose(up(out)[1], up(full)[1])
    np.testing.assert_allclose(out["embed_tokens"]["weight"], full["embed_tokens"]["weight"], atol=1e-6)


def _layers_only(seed):
    return {"layers": _params(seed)["layers"]}


def test_jit_does_not_retrace_when_weights_change():
    base = _layers_only(0)
    models = [jax.tree.map(lambda a, b: a + 0.1 * b, base, _layers_only(i)) for i in (1, 2, 3)]
    traces = []

    @jax.jit
    def merged(w, density, key):
        traces.append(1)
        return merging.dare_ties(base, models, w, key=key, density=density)

    for i in range(4):
        merged(jnp.array([0.1 * i, 0.5, 0.3]), jnp.array([0.5, 0.6, 0.7]), jax.random.PRNGKey(i))
    assert len(traces) == 1


def test_random_methods_are_deterministic_per_key():
    base = _layers_only(0)
    models = [jax.tree.map(lambda a, b: a + 0.1 * b, base, _layers_only(i)) for i in (1, 2)]
    w = jnp.array([1.0, 1.0])
    a = merging.della(base, models, w, key=jax.random.PRNGKey(0), density=0.5)
    b = merging.della(base, models, w, key=jax.random.PRNGKey(0), density=0.5)
    c = merging.della(base, models, w, key=jax.random.PRNGKey(1), density=0.5)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    up = lambda t: t["layers"]["mlp"]["up_proj"]["weight"]
    assert not np.array_equal(up(a), up(c))
    assert not np.array_equal(up(a)[0] != up(base)[0], up(a)[1] != up(base)[1])  # a key per layer
    with pytest.raises(ValueError, match="PRNG key or"):
        merging.dare_ties(base, models, w, density=0.5)


def test_stack_layers_and_errors():
    a, b = _params(1), _params(2)
    out = merging.stack_layers([a, b], [(0, 0, 2), (1, 1, 3)])
    up = out["layers"]["mlp"]["up_proj"]["weight"]
    assert up.shape[0] == 4
    np.testing.assert_array_equal(up[2:], b["layers"]["mlp"]["up_proj"]["weight"][1:3])
    np.testing.assert_array_equal(out["embed_tokens"]["weight"], a["embed_tokens"]["weight"])
    with pytest.raises(ValueError, match="no parameter.*dens"):
        merging.ties(a, [b], jnp.ones(1), dens=0.5)
    with pytest.raises(ValueError, match="needs a base"):
        merging.ties(None, [b], jnp.ones(1))
    with pytest.raises(merging.UnknownMethodError, match="supported: .*breadcrumbs, breadcrumbs_ties"):
        merging.get_method("tiez")
