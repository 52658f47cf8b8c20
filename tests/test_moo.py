"""Multi-objective toolkit against small cases worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.moo import (
    das_dennis,
    dirichlet,
    hypervolume,
    ideal_point,
    pareto_mask,
    plot_front,
    tchebycheff,
    weighted_sum,
)


@pytest.mark.parametrize("k,divisions", [(1, 4), (2, 1), (2, 5), (3, 4), (4, 3), (5, 2)])
def test_das_dennis_count_and_lattice(k, divisions):
    grid = np.asarray(das_dennis(k, divisions))
    assert grid.shape == (math.comb(divisions + k - 1, k - 1), k)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=1e-6)
    steps = grid * divisions
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
    assert len({tuple(r) for r in np.round(steps).astype(int)}) == len(grid)
    np.testing.assert_allclose(grid[0], np.eye(k)[0])


def test_das_dennis_small_grid_and_errors():
    np.testing.assert_allclose(das_dennis(2, 2), [[1, 0], [0.5, 0.5], [0, 1]])
    with pytest.raises(ValueError, match="divisions must be a positive integer"):
        das_dennis(3, 0)


def test_dirichlet_simplex_and_seed():
    lam = dirichlet(4000, 3, seed=0)
    assert lam.shape == (4000, 3) and lam.dtype == jnp.float32
    assert bool(jnp.all(lam >= 0))
    np.testing.assert_allclose(lam.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(lam.mean(axis=0), 1 / 3, atol=0.02)  # uniform on the simplex
    np.testing.assert_array_equal(dirichlet(5, 3, seed=1), dirichlet(5, 3, seed=1))
    np.testing.assert_array_equal(dirichlet(5, 3, seed=1), dirichlet(5, 3, jax.random.PRNGKey(1)))
    assert not np.allclose(dirichlet(5, 3, seed=1), dirichlet(5, 3, seed=2))
    with pytest.raises(ValueError, match="n must be"):
        dirichlet(0, 3)


def test_scalarisations_on_known_points():
    f = jnp.array([[0.2, 0.8], [0.6, 0.4]])
    lam = jnp.array([0.25, 0.75])
    np.testing.assert_allclose(weighted_sum(f, lam), [0.65, 0.45], rtol=1e-6)
    z = ideal_point(f)
    np.testing.assert_allclose(z, [0.6, 0.8])
    # Row 0: max(0.25 * 0.4, 0.75 * 0) = 0.1; row 1: max(0.25 * 0, 0.75 * 0.4) = 0.3.
    np.testing.assert_allclose(tchebycheff(f, lam, z), [0.1, 0.3], rtol=1e-6)
    # vmapped over preference vectors: each λ scores every solution.
    lams = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    table = jax.jit(jax.vmap(lambda l: tchebycheff(f, l, z)))(lams)
    np.testing.assert_allclose(table, [[0.4, 0.0], [0.0, 0.4], [0.2, 0.2]], rtol=1e-6)
    with pytest.raises(ValueError, match="last"):
        weighted_sum(f, jnp.ones(3) / 3)


def test_pareto_mask_by_hand():
    s = np.array([[1, 5], [2, 4], [2, 2], [3, 1], [0, 0], [2, 4], [3, 0.5]])
    # (2,2) and (0,0) are dominated by (2,4); (3,0.5) by (3,1); the duplicate (2,4) stays.
    np.testing.assert_array_equal(pareto_mask(s), [1, 1, 0, 1, 0, 1, 0])
    s3 = np.array([[1, 1, 1], [1, 1, 0], [0, 2, 0], [1, 1, 1]])
    np.testing.assert_array_equal(jax.jit(pareto_mask)(s3), [1, 0, 1, 1])
    assert pareto_mask(np.zeros((1, 3))).tolist() == [True]
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        pareto_mask(np.zeros(3))


def test_hypervolume_by_hand():
    front = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # Staircase areas from the reference (0,0): 1*3 + 1*2 + 1*1.
    assert hypervolume(front, [0, 0]) == pytest.approx(6.0)
    # From (0.5,0.5): 0.5*2.5 + 1*1.5 + 1*0.5.
    assert hypervolume(front, [0.5, 0.5]) == pytest.approx(3.25)
    # A dominated point and a point below the reference add nothing.
    more = np.vstack([front, [[1.0, 1.0], [5.0, -1.0]]])
    assert hypervolume(more, [0, 0]) == pytest.approx(6.0)
    assert hypervolume(np.array([[-1.0, -1.0]]), [0, 0]) == 0.0
    assert hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0
    # 3-D: boxes 2x1x1 and 1x2x1 overlap in a unit cube.
    assert hypervolume(np.array([[1.0, 2.0, 3.0]]), np.zeros(3)) == pytest.approx(6.0)
    assert hypervolume(np.array([[2.0, 1, 1], [1, 2, 1]]), np.zeros(3)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="ref"):
        hypervolume(front, [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[np.nan, 1.0]]), [0, 0])


def test_hypervolume_matches_moocore_maximise():
    import moocore

    pts = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (30, 3)))
    ref = np.array([0.1, 0.0, 0.05])
    keep = np.all(pts > ref, axis=1)
    expected = moocore.hypervolume(pts[keep], ref=ref, maximise=True)
    assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_plot_front_writes_png(tmp_path, k):
    scores = np.asarray(jax.random.uniform(jax.random.PRNGKey(k), (12, k)))
    out = plot_front(tmp_path / "plots" / f"front{k}.png", scores,
                     others={"experts": np.eye(k), "TIES": scores[:2] * 0.5}, title=f"{k} tasks")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least 2 tasks"):
        plot_front(tmp_path / "x.png", scores[:, :1])
    with pytest.raises(ValueError, match="others"):
        plot_front(tmp_path / "x.png", scores, others={"bad": np.ones((2, k + 1))})


@pytest.mark.parametrize("scores, dominated", [([[1.0, 0.5], [0.5, 1.0]], False),
                                               ([[1.0, 0.5], [0.5, 1.0], [0.2, 0.2]], True)])
def test_pairs_legend_names_dominated_solutions_only_when_there_are_some(tmp_path, monkeypatch, scores, dominated):
    """front.png's legend: "(dominated)" appears only when some solution is dominated, the front and
    each single point always."""
    from matplotlib.figure import Figure

    from hm3jax.moo.plots import plot_pairs

    seen = []
    legend = Figure.legend
    monkeypatch.setattr(Figure, "legend", lambda self, handles, labels, **kw: (seen.extend(labels),
                                                                                legend(self, handles, labels, **kw))[1])
    plot_pairs([tmp_path / "f.png"], np.asarray(scores), ["a", "b"], points={"base": [0.1, 0.1]}, label="HM3")
    assert ("HM3 (dominated)" in seen) is dominated
    assert "HM3 (front)" in seen and "base" in seen
