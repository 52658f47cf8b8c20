"""Alignment maps at model switches (models.align, search.align): identity at the start, applied only
where a path switches models, fitted to shrink the statistics gap they target, and used by the
lower level's scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.models import forward_path, init_params
from hm3jax.models.align import init_align_params
from hm3jax.models.config import ModelConfig
from hm3jax.models.pool import build_pool, shell_of
from hm3jax.objectives.batch import Batch
from hm3jax.search.align import AlignConfig, coral_gap, fit_alignment, pool_alignment
from hm3jax.search.lower import build_search, make_model_scorer
from hm3jax.settings import old_lower

CFG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
K, L = 2, CFG.num_hidden_layers


def _scaled(params, factor, offset):
    """Layers whose outputs differ in scale and direction from the base's (distinct statistics)."""
    layers = jax.tree.map(lambda a: a * factor if a.ndim == 3 else a + offset, params["layers"])
    return {**params, "layers": layers}


@pytest.fixture(scope="module")
def pool_models():
    base = init_params(CFG, jax.random.key(0))
    experts = [_scaled(init_params(CFG, jax.random.key(1)), 6.0, 0.5),
               _scaled(init_params(CFG, jax.random.key(2)), 0.3, -0.3)]
    merged = jax.tree.map(lambda a, b: (a + b) / 2, *experts)
    rng = np.random.default_rng(0)
    n, s = 24, 10
    tokens = rng.integers(1, CFG.vocab_size, (n, s)).astype(np.int32)
    mask = np.ones((n, s), np.int32)
    mask[::3, :3] = 0  # some left padding: statistics count real tokens only
    target = np.zeros((n, s), bool)
    target[:, -3:] = True
    batch = Batch(tokens, mask, target, (np.arange(n) % K).astype(np.int32))
    return base, experts, [merged], batch


def test_fresh_maps_are_the_identity_and_only_switches_are_mapped(pool_models):
    _, experts, merged, batch = pool_models
    pool = build_pool(experts + merged)
    align = pool_alignment(init_align_params(jax.random.key(3), CFG.hidden_size, K + 1, L, L), K, L, K + 1)
    shell = shell_of(merged[0])
    tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
    switching = jnp.asarray([0, 2 * L + 1, L + 2])  # expert 0, the merge, expert 1: three switches
    plain = forward_path(CFG, shell, pool, switching, tokens, mask)
    np.testing.assert_array_equal(forward_path(CFG, shell, pool, switching, tokens, mask, align), plain)

    # Non-zero maps change a path that switches models, and leave one that stays in the shell's model.
    w2 = 0.05 * jax.random.normal(jax.random.key(4), align.params["w2"].shape)
    moved = align.replace(params={**align.params, "w2": w2})
    assert not np.allclose(forward_path(CFG, shell, pool, switching, tokens, mask, moved), plain, atol=1e-4)
    staying = jnp.asarray([2 * L, -1, 2 * L + 1, 2 * L + 2])  # the merge's own layers, one step skipped
    np.testing.assert_array_equal(forward_path(CFG, shell, pool, staying, tokens, mask, moved),
                                  forward_path(CFG, shell, pool, staying, tokens, mask))


@pytest.mark.slow  # ~15 s: compiles the fit and the scorer
def test_fit_shrinks_the_gap_and_the_scorer_runs_paths_with_the_maps(pool_models):
    base, experts, merged, batch = pool_models
    cfg = AlignConfig(enabled=True, steps=60, paths=6, rows=24, learning_rate=1e-2)
    fit = fit_alignment(CFG, cfg, experts, merged, batch, jax.random.key(5))
    assert fit.gap_after < 0.5 * fit.gap_before, (fit.gap_before, fit.gap_after)

    # The gap at one switch, measured directly: expert 0's layer 0, then expert 1's layer 1.
    pool = build_pool(experts + merged)
    tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
    from hm3jax.models.decoder import embed, run_layers

    def handed_over(align):
        tap = lambda h, mapped, idx, switched: mapped
        _, states = run_layers(CFG, pool.layers, jnp.asarray([0, L + 1]), embed(shell_of(merged[0]), tokens),
                               mask, align, tap=tap)
        return states[1][np.asarray(batch.attention_mask) == 1]

    def own(model):  # the input layer 1 of expert 1 sees in its own model
        _, states = run_layers(CFG, model["layers"], jnp.arange(L), embed(shell_of(model), tokens), mask,
                               tap=lambda h, *_: h)
        return states[1][np.asarray(batch.attention_mask) == 1]

    target = own(experts[1])
    assert float(coral_gap(handed_over(fit.alignment), target)) < float(coral_gap(handed_over(None), target))

    # The lower level's scorer runs every path with the maps: its scores equal forward_path's.
    lc = old_lower(align=cfg)
    data, _, _ = build_search(CFG, experts, merged, batch, np.full((1, K), 0.5), np.ones(K), lc, base)
    data = data._replace(align=fit.alignment)
    paths = jnp.asarray([[0, L + 1, 2 * L + 2], [2 * L, 2 * L + 1, 2 * L + 2]])
    got = np.asarray(make_model_scorer(CFG, K, lc).full(data, paths, jnp.int32(0)))
    from hm3jax.objectives.scoring import exact_match, task_means

    for p, row in zip(paths, got):
        logits = forward_path(CFG, shell_of(merged[0]), pool, p, tokens, mask, fit.alignment)
        want = task_means(exact_match(logits, Batch(*(jnp.asarray(x) for x in batch))), batch, K)
        np.testing.assert_allclose(row, np.asarray(want), atol=1e-6)
    # a path that switches is scored differently with and without the maps (they do something)
    plain = forward_path(CFG, shell_of(merged[0]), pool, paths[0], tokens, mask)
    aligned = forward_path(CFG, shell_of(merged[0]), pool, paths[0], tokens, mask, fit.alignment)
    assert not np.allclose(plain, aligned, atol=1e-3)


@pytest.mark.parametrize("kw,match", [
    ({"rank": -1}, r"lower.align.rank must be an integer >= 0"),
    ({"steps": 0}, r"lower.align.steps must be an integer >= 1"),
    ({"swap_prob": 0.0}, r"lower.align.swap_prob must be in \(0, 1\]"),
    ({"learning_rate": 0.0}, r"lower.align.learning_rate must be > 0"),
])
def test_align_config_errors_name_the_key(kw, match):
    assert not AlignConfig().enabled  # off by default
    with pytest.raises(ValueError, match=match):
        AlignConfig(**kw)


def test_export_refuses_an_aligned_solution_and_writes_nothing(tmp_path):
    from hm3jax.recommend import RecommendError, export_solution

    sol = {"preference": [0.5, 0.5], "upper": None, "path": [["math", 0], ["code", 1]], "shell": "math",
           "scores": {"search": [0, 0], "heldout": [0, 0]}, "cost": None, "dominated": False, "aligned": True}
    with pytest.raises(RecommendError, match="alignment maps at model switches"):
        export_solution(tmp_path / "run", sol, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_switches_models_follows_the_shell_then_each_step():
    from hm3jax.run.solutions import switches_models

    assert not switches_models([["merge", 0], None, ["merge", 2]], "merge")
    assert switches_models([["merge", 0], ["math", 1], ["merge", 2]], "merge")
    assert switches_models([["math", 0], ["math", 1]], "merge")  # the shell's embeddings, then math
