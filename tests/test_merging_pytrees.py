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

    got = merging.dare_ties(base, models, w, key=key, density=0.5, tensor_name=name,
                            is_stacked=lambda p: p == ("w",))

    def hf(t):
        return {"layers": {"mlp": {"up_proj": {"weight": t.w}}}, "norm": {"weight": t.b}}

    want = merging.dare_ties(hf(base), [hf(x) for x in models], w, key=key, density=0.5)
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


# ------------------------------------------------------------------ merging as a generic pytree library
RANDOM = sorted(n for n, m in METHODS.items() if m.random)


class NNXStack(nnx.Module):
    """Layers in an nnx.List (paths layers/0/..., which have no HF name) and an integer counter."""

    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
        self.steps = nnx.Variable(jnp.array(7, jnp.int32))


def _eqx_params(seed):
    eqx = pytest.importorskip("equinox")
    return eqx.nn.MLP(32, 4, 32, 2, key=jax.random.key(seed))  # the whole module: arrays and functions


def _same_task_vector_in_every_layer(make, leaf_filter):
    """(base, [ft1, ft2]) where every 32x32 weight moves by the same task vector."""
    base = make(0)
    tau = [jax.random.normal(jax.random.key(10 + i), (32, 32)) * 0.1 for i in range(2)]

    def finetune(i):
        return jax.tree.map(lambda x: x + tau[i] if leaf_filter(x) else x, base)

    return base, [finetune(0), finetune(1)]


def _is_square(x):
    return isinstance(x, jax.Array) and x.shape == (32, 32)


@pytest.mark.parametrize("family", ["equinox_mlp", "nnx_list"])
@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_merge_equinox_and_nnx_list_models(family, name):
    make = _eqx_params if family == "equinox_mlp" else (lambda s: nnx.state(NNXStack(nnx.Rngs(s))))
    base, models = _same_task_vector_in_every_layer(make, _is_square)
    fn = getattr(merging, name)
    w = np.array([0.6, 0.4])
    got = fn(base, models, w, key=jax.random.key(0), density=0.5)
    assert jax.tree.structure(got) == jax.tree.structure(base)
    again = fn(base, models, w, key=jax.random.key(0), density=0.5)
    other = fn(base, models, w, key=jax.random.key(1), density=0.5)
    squares = [(g, b, a, o) for g, b, a, o in zip(jax.tree.leaves(got), jax.tree.leaves(base), jax.tree.leaves(again),
                                                  jax.tree.leaves(other)) if _is_square(b)]
    assert len(squares) >= 2
    drops = []
    for g, b, a, o in squares:
        np.testing.assert_array_equal(g, a)  # same key, same merge
        assert not np.array_equal(g, o)  # another key, other masks
        drops.append(np.asarray(g) == np.asarray(b))
        # about half of the entries dropped by both models (density 0.5 each): ~1/4 unchanged
        assert 0.1 < drops[-1].mean() < 0.45, drops[-1].mean()
    # Every layer moved by the same task vector, yet draws its own mask (a name of its own per leaf).
    assert not np.array_equal(drops[0], drops[1])
    for g, b in zip(jax.tree.leaves(got), jax.tree.leaves(base)):
        if not _is_square(b) and not isinstance(b, jax.Array):
            assert g is b  # non-array leaves (equinox's activation functions) are copied
    if family == "nnx_list":
        assert got["steps"].get_value().dtype == jnp.int32 and int(got["steps"].get_value()) == 7


def test_hf_layout_keeps_hf_tensor_names_and_other_trees_use_keystr():
    """The default per-tensor key of an HF-layout dict is its HF name (the CLI's stream); of any other
    tree, jax.tree_util.keystr of the leaf's path."""
    x, y = jnp.zeros((8, 8)), jnp.ones((8, 8)) * 0.1
    key = jax.random.key(3)
    mask_of = lambda out: np.asarray(out) != 0
    hf = merging.dare_linear({"norm": {"weight": x}}, [{"norm": {"weight": y}}], np.ones(1), key=key, density=0.5)
    want = merging.random_drop(y, 0.5, jax.random.split(merging.tensor_key(key, "model.norm.weight"), 1)[0])
    np.testing.assert_array_equal(mask_of(hf["norm"]["weight"]), mask_of(want))
    tree = [x]
    got = merging.dare_linear(tree, [[y]], np.ones(1), key=key, density=0.5)
    want = merging.random_drop(y, 0.5, jax.random.split(merging.tensor_key(key, jax.tree_util.keystr((
        jax.tree_util.SequenceKey(0),))), 1)[0])
    np.testing.assert_array_equal(mask_of(got[0]), mask_of(want))


def test_stacked_models_tree_merges_like_the_list():
    """A models pytree whose leaves are [M, ...] (a vmapped ensemble) is the list of M models."""
    base, models = _finetunes(_nnx, 3)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    w = np.array([0.5, 0.3, 0.2])
    for fn, kw in ((merging.task_arithmetic, {}), (merging.dare_ties, {"density": 0.5, "key": jax.random.key(0)})):
        jax.tree.map(np.testing.assert_array_equal, fn(base, stacked, w, **kw), fn(base, models, w, **kw))
    got = merging.linear(None, stacked, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, merging.linear(None, models, w))
    with pytest.raises(ValueError, match="takes exactly 1 non-base model"):
        merging.slerp(base, jax.tree.map(lambda *xs: jnp.stack(xs), *models[:2]), t=0.5)


@pytest.mark.parametrize(("call", "match"), [
    (lambda b, ms: merging.slerp(b, ms[:2], t=0.5), r"'slerp' takes exactly 1 non-base model\(s\), got 2"),
    (lambda b, ms: merging.passthrough(None, ms[:2]), r"'passthrough' takes exactly 1 non-base model\(s\), got 2"),
    (lambda b, ms: merging.model_stock(b, ms[:1]), r"'model_stock' takes at least 2 non-base model\(s\), got 1"),
    (lambda b, ms: merging.nuslerp(b, ms[:3], np.ones(3)), r"'nuslerp' takes exactly 2 non-base model\(s\), got 3"),
    (lambda b, ms: merging.linear(b, ms[:2], np.ones(2)), r"'linear' takes no separate base"),
    (lambda b, ms: merging.ties(b, [], np.ones(0)), r"ties: no models to merge"),
], ids=["slerp2", "passthrough2", "model_stock1", "nuslerp3", "linear_base", "none"])
def test_model_counts_are_checked(call, match):
    base, models = _finetunes(_nnx, 3)
    with pytest.raises(ValueError, match=match):
        call(base, models)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "breadcrumbs"])
def test_density_outside_unit_interval_is_refused(name, density):
    base, models = _finetunes(_nnx, 2)
    kw = {"key": jax.random.key(0)} if METHODS[name].random else {}
    with pytest.raises(ValueError, match=rf"{name}: tensor \S+: density {density} is outside \(0, 1\]"):
        getattr(merging, name)(base, models, np.ones(2), density=density, **kw)
    with pytest.raises(ValueError, match=rf"density {density} is outside"):  # one bad model among two
        getattr(merging, name)(base, models, np.ones(2), density=np.array([0.5, density]), **kw)
    # and traced densities (no value to check) still merge
    jax.jit(lambda d: getattr(merging, name)(base, models, np.ones(2), density=d, trim="search", **kw)
            if name == "ties" else getattr(merging, name)(base, models, np.ones(2), density=d, **kw))(0.5)


def test_integer_leaves_are_copied_when_equal_and_refused_when_not():
    base, m1, m2 = (nnx.state(NNXStack(nnx.Rngs(i))) for i in range(3))
    got = merging.task_arithmetic(base, [m1, m2], np.array([0.5, 0.5]))
    assert got["steps"].get_value().dtype == jnp.int32 and int(got["steps"].get_value()) == 7
    m2["steps"].set_value(jnp.array(8, jnp.int32))
    with pytest.raises(ValueError, match=r"task_arithmetic: tensor steps/value is a non-float leaf \(int32 array\) "
                                         r"whose values differ between base and models\[1\]"):
        merging.task_arithmetic(base, [m1, m2], np.array([0.5, 0.5]))


@pytest.mark.parametrize(("key", "match"), [
    (0, r"dare_ties: key= takes a PRNG key, not the int 0; pass key=jax\.random\.key\(0\)"),
    (np.int64(5), r"not the int 5"),
    ("rngs", r"dare_ties: key= takes a PRNG key, not an nnx\.Rngs; pass one of its keys, key=rngs\.params\(\)"),
    ("keys", r"key= takes one PRNG key .*shape \(2,\)"),
])
def test_bad_keys_are_refused_naming_key(key, match):
    base, models = _finetunes(_nnx, 2)
    key = {"rngs": nnx.Rngs(0), "keys": jax.random.split(jax.random.key(0))}.get(key, key) if isinstance(key, str) \
        else key
    with pytest.raises(TypeError, match=match):
        merging.dare_ties(base, models, np.ones(2), key=key, density=0.5)


def test_key_is_keyword_and_a_positional_key_still_works_with_a_warning():
    base, models = _finetunes(_nnx, 2)
    w, key = np.array([0.5, 0.5]), jax.random.PRNGKey(4)
    want = merging.dare_ties(base, models, w, key=key, density=0.5)
    for fn in (merging.dare_ties, METHODS["dare_ties"].merge):
        with pytest.warns(DeprecationWarning, match="pass the PRNG key as key="):
            got = fn(base, models, w, key, density=0.5)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(TypeError, match="both positionally and as key="):
        merging.dare_ties(base, models, w, key, key=key)


def test_help_lists_each_methods_parameters_and_defaults():
    import inspect
    import pydoc

    text = pydoc.render_doc(merging.ties, renderer=pydoc.plaintext)
    for part in ("density: 'Value' = 1.0", "normalize: 'bool' = True", "trim: 'str' = 'exact'",
                 "lambda_: 'Value' = 1.0", "rescale: 'bool' = False", "density: fraction of each",
                 "Returns the merged pytree"):
        assert part in text, part
    assert "<object object" not in text and "<object object" not in repr(METHODS["slerp"])
    sig = inspect.signature(merging.dare_ties)
    assert sig.parameters["key"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "t" in inspect.signature(merging.slerp).parameters
    assert inspect.signature(merging.slerp).parameters["t"].default is inspect.Parameter.empty  # required
    # every method's function spells out the declared parameters, with the declared defaults
    common = {"base", "models", "weights", "key", "masks", "compute_dtype", "is_stacked", "tensor_name", "kwargs",
              "lambda_"}
    no_op = {"int8_mask", "density", "rescale"}  # declared by task_arithmetic for recipes; no effect there
    for name, method in METHODS.items():
        params = inspect.signature(getattr(merging, name)).parameters
        for p in params:
            if p not in common:
                assert p in method.params, (name, p)
                declared = method.params[p].default
                assert params[p].default == (inspect.Parameter.empty if declared is merging.REQUIRED else declared)
        missing = set(method.params) - set(params) - {"weight", "lambda"}
        assert missing <= no_op, (name, missing)
        assert ("lambda" in method.params) == ("lambda_" in params), name
    docs = [getattr(merging, name).__doc__ for name in METHODS]
    assert all(docs) and len(set(docs)) == len(docs)  # a docstring of its own for each


def test_lambda_keyword_alias():
    base, models = _finetunes(_nnx, 2)
    w = np.array([0.5, 0.5])
    a = merging.task_arithmetic(base, models, w, lambda_=0.3)
    b = merging.task_arithmetic(base, models, w, **{"lambda": 0.3})
    jax.tree.map(np.testing.assert_array_equal, a, b)
    full = merging.task_arithmetic(base, models, w)
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(full)))
    with pytest.raises(TypeError, match="lambda_ or lambda, not both"):
        merging.ties(base, models, w, lambda_=0.3, **{"lambda": 0.5})


def test_closed_over_params_are_not_constants_to_fold():
    """A jitted merge closing over the params puts them behind an optimization barrier (XLA would
    otherwise constant-fold the TIES trims at compile time: 10x the compile time) and gives the same
    result as the params passed as arguments."""
    base, models = _finetunes(lambda s: {"w": jax.random.normal(jax.random.key(s), (64, 64))}, 2)
    closure = jax.jit(lambda w: merging.ties(base, models, w, density=0.5))
    args = jax.jit(lambda b, ms, w: merging.ties(b, ms, w, density=0.5))
    w = jnp.array([0.6, 0.4])
    assert "optimization_barrier" in closure.lower(w).as_text()
    assert "optimization_barrier" not in args.lower(base, models, w).as_text()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), closure(w), args(base, models, w))


def test_py_typed_marker_is_packaged():
    import pathlib

    root = pathlib.Path(merging.__file__).parents[2]
    assert (root / "hm3jax" / "py.typed").is_file()
    text = (root / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n# PEP 561: the package ships its own type annotations\nhm3jax = ["py.typed"]' \
        in text
