"""Merges over any JAX pytree: Flax linen params, an NNX State, NamedTuples, flax.struct dataclasses
and lists merge exactly like the same numbers laid out as the HF dict of models/params.py."""

from __future__ import annotations

from typing import NamedTuple

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from hm3jax import merging
from hm3jax.merging import METHODS

DETERMINISTIC = sorted(n for n, m in METHODS.items() if not m.random)


def _inputs(name: str, seed: int = 0):
    """(number of models, params, weights) that `name` accepts."""
    method = METHODS[name]
    m = 1 if method.max_models == 1 else 2 if method.max_models == 2 or name == "model_stock" else 3
    params = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.02}, "ties": {"density": 0.5},
              "breadcrumbs": {"density": 0.8, "gamma": 0.05},
              "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05}, "sce": {"select_topk": 0.5}}.get(name, {})
    weights = np.array([0.5, 0.3, 0.2][:m]) if method.uses_weights else None
    return m, params, weights


class MLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Dense(16)(x))
        return linen.Dense(4)(x)


class NNXClassifier(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)


class Tuple2(NamedTuple):
    w: jax.Array
    b: jax.Array


@struct.dataclass
class Block:
    kernel: jax.Array
    scale: jax.Array


def _linen(seed):
    return MLP().init(jax.random.key(seed), jnp.ones((1, 8)))


def _nnx(seed):
    return nnx.split(NNXClassifier(nnx.Rngs(seed)))[1]


def _named(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"t": Tuple2(jax.random.normal(k1, (6, 5)), jax.random.normal(k2, (5,))),
            "blocks": [Block(jax.random.normal(k1, (4, 3)), jnp.ones(3) + seed)]}


FAMILIES = {"linen": _linen, "nnx_state": _nnx, "namedtuple_struct_list": _named}


def _finetunes(make, m):
    base = make(0)
    # Small moves from the base (so slerp/karcher see nearby points), some entries untouched.
    models = [jax.tree.map(lambda a, d: a + 0.1 * d * (jnp.abs(d) > 0.3), base, make(i + 1)) for i in range(m)]
    return base, models


def _as_hf(tree):
    """The same numbers as an HF-layout dict (one shell tensor per leaf), and the way back."""
    leaves, treedef = jax.tree.flatten(tree)
    hf = {f"t{j:03d}": {"weight": leaf} for j, leaf in enumerate(leaves)}
    return hf, lambda d: jax.tree.unflatten(treedef, [d[f"t{j:03d}"]["weight"] for j in range(len(leaves))])


# Every method on a Flax linen model's params; three (a weighted sum, a trim, a spherical one) on
# the other containers, whose handling does not depend on the method.
CASES = [("linen", n) for n in DETERMINISTIC] + [
    (f, n) for f in ("nnx_state", "namedtuple_struct_list") for n in ("linear", "ties", "slerp")]


@pytest.mark.parametrize(("family", "name"), CASES)
def test_every_deterministic_method_merges_any_pytree_like_the_hf_dict(family, name):
    m, params, weights = _inputs(name)
    base, models = _finetunes(FAMILIES[family], m)
    method = METHODS[name]
    b = base if method.base != "ignored" else None
    got = method.merge(b, models, weights, **params)
    chex.assert_trees_all_equal_structs(got, base)  # the container types survive
    hf_base, back = _as_hf(base)
    want = method.merge(None if b is None else hf_base, [_as_hf(x)[0] for x in models], weights, **params)
    chex.assert_trees_all_close(got, back(want), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal_dtypes(got, base)
    if name in ("linear", "task_arithmetic", "ties"):  # and the merge moved something
        assert any(not np.allclose(g, x) for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(base)))


def _stacked(seed):
    k = jax.random.key(seed)
    return Tuple2(jax.random.normal(k, (3, 8, 5)), jax.random.normal(jax.random.fold_in(k, 1), (5,)))


def test_stacked_hook_merges_per_layer_like_the_hf_layers_leaf():
    """A hook marks a leaf as stacked layers; a TIES trim then keeps the top-k of each layer."""
    base, models = _finetunes(_stacked, 3)
    w = np.array([0.6, 0.3, 0.4])
    got = merging.ties(base, models, w, density=0.3, is_stacked=lambda names: names == ("w",))

    def hf(t):
        return {"layers": {"mlp": {"up_proj": {"weight": t.w}}}, "norm": {"weight": t.b}}

    want = merging.ties(hf(base), [hf(x) for x in models], w, density=0.3)
    np.testing.assert_allclose(got.w, want["layers"]["mlp"]["up_proj"]["weight"], atol=1e-6)
    np.testing.assert_allclose(got.b, want["norm"]["weight"], atol=1e-6)
    flat = merging.ties(base, models, w, density=0.3)  # no hook: one trim over all layers at once
    assert not np.allclose(flat.w, got.w)


def test_tensor_name_hook_reproduces_the_hf_random_stream():
    base, models = _finetunes(_stacked, 2)
    w, key = np.array([0.5, 0.5]), jax.random.key(3)
    names = {"w": "mlp.up_proj.weight", "b": None}

    def name(path, layer):
        return f"model.layers.{layer}.{names['w']}" if path == ("w",) else "model.norm.weight"

    got = merging.dare_ties(base, models, w, key, density=0.5, tensor_name=name,
                            is_stacked=lambda p: p == ("w",))

    def hf(t):
        return {"layers": {"mlp": {"up_proj": {"weight": t.w}}}, "norm": {"weight": t.b}}

    want = merging.dare_ties(hf(base), [hf(x) for x in models], w, key, density=0.5)
    np.testing.assert_array_equal(got.w, want["layers"]["mlp"]["up_proj"]["weight"])
    np.testing.assert_array_equal(got.b, want["norm"]["weight"])


def test_per_tensor_parameters_as_a_pytree_of_the_same_structure():
    base, models = _finetunes(_nnx, 2)
    density = jax.tree.map(lambda _: 0.9, base)
    density["out"]["kernel"].set_value(0.2)  # one tensor trimmed much harder than the others
    w = np.array([0.7, 0.5])
    got = merging.ties(base, models, w, density=density)
    for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
        d = 0.2 if jax.tree_util.keystr(path) == "['out']['kernel'].value" else 0.9
        pick = lambda t: next(x for p, x in jax.tree_util.tree_flatten_with_path(t)[0] if p == path)
        one = merging.ties({"x": {"weight": pick(base)}}, [{"x": {"weight": pick(x)}} for x in models], w,
                           density=d)
        np.testing.assert_allclose(leaf, one["x"]["weight"], atol=1e-6)


def test_mismatched_pytrees_are_named():
    base, models = _finetunes(_nnx, 2)
    with pytest.raises(ValueError, match=r"models\[1\] does not have the base's structure"):
        merging.linear(None, [base, {"hidden": models[1]["hidden"]}], np.ones(2))
    bad = jax.tree.map(lambda a: a, models[1])
    bad["out"]["bias"].set_value(jnp.zeros(5))
    with pytest.raises(ValueError, match=r"models\[1\] tensor out/bias/value has shape \(5,\); expected \(4,\)"):
        merging.task_arithmetic(base, [models[0], bad], np.ones(2))
    with pytest.raises(ValueError, match="per-tensor density: its structure does not match"):
        merging.ties(base, models, np.ones(2), density=[{"a": 0.5}])


def test_equinox_module_merges_if_installed():
    eqx = pytest.importorskip("equinox")
    base = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    models = [eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(i)) for i in (1, 2)]
    params = [eqx.filter(t, eqx.is_array) for t in (base, *models)]
    got = merging.task_arithmetic(params[0], params[1:], np.array([0.5, 0.5]))
    want = jax.tree.map(lambda b, x, y: b + 0.5 * (x - b) + 0.5 * (y - b), *params)
    chex.assert_trees_all_close(got, want, atol=1e-6)
