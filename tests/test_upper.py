"""Upper level: preference -> merged params, and CMA-ES tuning of (density, scale)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax import merging
from hm3jax.models import ModelConfig, init_params
from hm3jax.search.upper import UpperConfig, merge_for_preference, run_upper

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def zoo():
    base = init_params(CFG, jax.random.key(0))
    experts = [jax.tree.map(lambda a, i=i: a + 0.02 * jax.random.normal(jax.random.key(10 + i), a.shape),
                            base) for i in range(3)]
    return base, experts


def closeness(experts):
    """[K] scores, higher when the merge is nearer expert k (a smooth stand-in for task accuracy)."""
    def score(params):
        leaves = jax.tree.leaves(params)
        return jnp.stack([-sum(jnp.sum((a - b) ** 2) for a, b in zip(leaves, jax.tree.leaves(e)))
                          for e in experts])
    return score


def test_paper_merge_is_dare_ties_with_preference_weights(zoo):
    base, experts = zoo
    pref = jnp.asarray([0.5, 0.3, 0.2])
    key = jax.random.key(3)
    got = merge_for_preference("dare_ties", base, experts, pref, key, density=0.6, scale=1.2)
    want = merging.dare_ties(base, experts, pref, key, density=0.6, **{"lambda": 1.2})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_preference_moves_the_merge_towards_the_preferred_expert(zoo):
    base, experts = zoo
    score = closeness(experts)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        a = score(merge_for_preference(method, base, experts, [0.8, 0.1, 0.1], jax.random.key(0)))
        b = score(merge_for_preference(method, base, experts, [0.1, 0.1, 0.8], jax.random.key(0)))
        assert a[0] > b[0] and b[2] > a[2], method


def test_merges_vmap_over_preferences(zoo):
    base, experts = zoo
    prefs = jnp.asarray([[1, 0, 0], [0.2, 0.3, 0.5], [0, 0, 1.0]])
    for method in ("ties", "dare_ties"):
        many = jax.vmap(lambda p: merge_for_preference(method, base, experts, p, jax.random.key(1)))(prefs)
        for i in range(3):
            one = merge_for_preference(method, base, experts, prefs[i], jax.random.key(1))
            np.testing.assert_allclose(np.asarray(many["layers"]["mlp"]["up_proj"]["weight"][i]),
                                       np.asarray(one["layers"]["mlp"]["up_proj"]["weight"]), atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_es_tuning_improves_tchebycheff(zoo, method):
    base, experts = zoo
    score = closeness(experts)
    pref, ideal = [0.6, 0.3, 0.1], jnp.zeros(3)
    untuned = run_upper(UpperConfig(method=method), base, experts, pref, ideal, score, jax.random.key(0))
    tuned = run_upper(UpperConfig(method=method, tune=True, es_population=6, es_generations=3),
                      base, experts, pref, ideal, score, jax.random.key(0))
    assert tuned.tcheby < 0.95 * untuned.tcheby
    assert np.all(np.diff(tuned.history) <= 0)  # best-so-far never gets worse
    # the returned params really are the merge at the returned settings
    again = score(tuned.params)
    np.testing.assert_allclose(np.asarray(again), tuned.scores, rtol=1e-4)
    lo, hi = UpperConfig().density_range
    assert lo <= tuned.density <= hi


def test_upper_config_errors():
    with pytest.raises(ValueError, match="upper.method 'slerp' is not supported; supported: "
                                         "task_arithmetic, ties, dare_ties"):
        UpperConfig(method="slerp")
    with pytest.raises(ValueError, match=r"upper.density must be in \(0, 1\]"):
        UpperConfig(density=0.0)
