"""Parity with mergekit 0.1.5: the same YAML recipe through mergekit and through hm3jax.merging gives
the same tensors (max |diff| <= 1e-5), for every deterministic method, with filters, gradients and
slices. mergekit runs in-process (the code path of `mergekit-yaml`); one test runs our CLI as
`python -m hm3jax.merge` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

pytest.importorskip("mergekit")

from merging_zoo import LAYERS, build_zoo, load_params, read_all, run_mergekit

from hm3jax import merging
from hm3jax.merging.stream import merge_recipe

pytestmark = pytest.mark.slow  # mergekit runs in-process for every case

ATOL = 1e-5


@pytest.fixture(scope="session")
def zoo():
    return build_zoo()


def _models(z, params):
    return [{"model": z[f"ft{i + 1}"], "parameters": p} for i, p in enumerate(params)]


# Each recipe exercises one method plus a recipe feature (filters, gradients, slices, defaults).
def recipes(z):
    f32 = {"dtype": "float32"}
    return {
        "linear_filters_gradient": {
            **f32, "merge_method": "linear",
            "models": _models(z, [
                {"weight": [{"filter": "self_attn", "value": [1.0, 0.2]}, {"value": 0.5}]},
                {"weight": 0.3}, {"weight": [0.1, 0.9, 0.4]}])},
        "task_arithmetic_lambda_normalize": {
            **f32, "merge_method": "task_arithmetic", "base_model": z["base"],
            "parameters": {"lambda": 0.8, "normalize": True},
            "models": _models(z, [{"weight": [1.0, 0.3]}, {"weight": 0.5}, {"weight": -0.2}])},
        "ties_filters_per_model_density": {
            **f32, "merge_method": "ties", "base_model": z["base"],
            "models": [{"model": z["base"]}] + _models(z, [
                {"weight": [1.0, 0.3], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
                {"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": [0.2, 0.9]}])},
        "ties_rescale_no_normalize": {
            **f32, "merge_method": "ties", "base_model": z["base"],
            "parameters": {"normalize": False, "rescale": True, "int8_mask": True, "density": 0.35,
                           "weight": 0.6},
            "models": _models(z, [{}, {}, {"weight": 1.1}])},
        "breadcrumbs": {
            **f32, "merge_method": "breadcrumbs", "base_model": z["base"],
            "models": _models(z, [{"weight": 0.5, "density": 0.8, "gamma": 0.05},
                                  {"weight": 0.5, "density": 0.6}, {"weight": 0.4, "density": 0.9}])},
        "breadcrumbs_ties_small_gamma": {  # int(gamma * numel) == 0 for the norms
            **f32, "merge_method": "breadcrumbs_ties", "base_model": z["base"],
            "parameters": {"density": 0.7, "gamma": 0.01, "weight": 0.5},
            "models": _models(z, [{}, {}, {}])},
        "slerp_slices_filtered_gradient": {
            **f32, "merge_method": "slerp", "base_model": z["base"],
            "slices": [{"sources": [{"model": z["base"], "layer_range": [0, LAYERS]},
                                    {"model": z["ft1"], "layer_range": [0, LAYERS]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "nuslerp_base": {
            **f32, "merge_method": "nuslerp", "base_model": z["base"],
            "models": _models(z, [{"weight": 0.3}, {"weight": [0.9, 0.1]}])},
        "nuslerp_rows_no_base": {
            **f32, "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
            "models": _models(z, [{"weight": 0.6}, {"weight": 0.4}])},
        "model_stock": {
            **f32, "merge_method": "model_stock", "base_model": z["base"], "models": _models(z, [{}, {}, {}])},
        "model_stock_filter_wise": {
            **f32, "merge_method": "model_stock", "base_model": z["base"],
            "parameters": {"filter_wise": True}, "models": _models(z, [{}, {}, {}])},
        "sce": {
            **f32, "merge_method": "sce", "base_model": z["base"], "parameters": {"select_topk": 0.4},
            "models": _models(z, [{}, {}, {}])},
        "karcher": {**f32, "merge_method": "karcher", "models": _models(z, [{}, {}, {}])},
        "passthrough_stack_scale": {
            **f32, "merge_method": "passthrough",
            "slices": [{"sources": [{"model": z["ft1"], "layer_range": [0, 2]}]},
                       {"sources": [{"model": z["ft2"], "layer_range": [1, 4],
                                     "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]}}]}]},
        "task_arithmetic_two_slices": {
            **f32, "merge_method": "task_arithmetic", "base_model": z["base"],
            "slices": [
                {"sources": [{"model": z["base"], "layer_range": [0, 2]},
                             {"model": z["ft1"], "layer_range": [0, 2], "parameters": {"weight": [0.2, 1.0]}}]},
                {"sources": [{"model": z["base"], "layer_range": [2, 4]},
                             {"model": z["ft2"], "layer_range": [1, 3]}],
                 "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]}}]},
    }


def _compare(ref_dir: str, got_dir: str, atol: float = ATOL) -> None:
    ref, got = read_all(ref_dir), read_all(got_dir)
    assert sorted(got) == sorted(ref)
    worst = max((float(np.max(np.abs(ref[k] - got[k]))), k) for k in ref)
    assert worst[0] <= atol, f"max |diff| {worst[0]:.3g} at {worst[1]}"
    cfg_ref = json.load(open(os.path.join(ref_dir, "config.json")))
    cfg_got = json.load(open(os.path.join(got_dir, "config.json")))
    assert cfg_got["num_hidden_layers"] == cfg_ref["num_hidden_layers"]


CASES = list(recipes({k: k for k in ("base", "ft1", "ft2", "ft3")}))


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit(zoo, tmp_path, case):
    recipe = recipes(zoo)[case]
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    _compare(str(tmp_path / "mergekit"), str(tmp_path / "hm3jax"))


def test_bf16_output_matches_mergekit(zoo, tmp_path):
    """dtype float32 + out_dtype bfloat16: same float32 math, then one rounding (<= 1 bf16 ulp apart)."""
    recipe = {**recipes(zoo)["task_arithmetic_lambda_normalize"], "out_dtype": "bfloat16"}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2**-7, atol=1e-6, err_msg=k)
    cfg = json.load(open(tmp_path / "hm3jax" / "config.json"))
    assert cfg["dtype"] == "bfloat16"


def test_cli_subprocess_matches_mergekit(zoo, tmp_path):
    """The CLI contract: `python -m hm3jax.merge CONFIG.yml OUT_DIR` on a YAML file."""
    recipe = recipes(zoo)["ties_filters_per_model_density"]  # tokenizer files copied from the base
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "hm3jax.merge", str(cfg), str(out), "--quiet",
                        "--max-shard-size", "40k"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run_mergekit(recipes(zoo)["ties_filters_per_model_density"], str(tmp_path / "mergekit"))
    _compare(str(tmp_path / "mergekit"), str(out))
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
            "mergekit_config.yml"} <= files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded at 40 kB
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]  # no temp dir left


# ------------------------------------------------------------------ multislerp, nearswap, ram, ramplus_tl,
# arcee_fusion: every output tensor against mergekit 0.1.5, through the out-of-core merge and the pytree API.
def new_recipes(z):
    f32 = {"dtype": "float32"}
    return {
        "multislerp_base_gradient": {
            **f32, "merge_method": "multislerp", "base_model": z["base"],
            "models": _models(z, [{"weight": 0.5}, {"weight": [0.2, 0.8]}, {"weight": 0.3}])},
        "multislerp_no_base_unnormalized": {
            **f32, "merge_method": "multislerp", "parameters": {"normalize_weights": False, "eps": 1e-6},
            "models": _models(z, [{"weight": 0.5}, {"weight": 0.3}])},
        "multislerp_one_model": {  # returned unchanged, base ignored
            **f32, "merge_method": "multislerp", "base_model": z["base"], "models": _models(z, [{"weight": 0.7}])},
        "nearswap_gradient": {
            **f32, "merge_method": "nearswap", "base_model": z["base"], "parameters": {"t": [0.0001, 0.01]},
            "models": [{"model": z["ft2"]}]},
        "nearswap_filtered": {
            **f32, "merge_method": "nearswap", "base_model": z["base"],
            "parameters": {"t": [{"filter": "mlp", "value": 0.05}, {"value": 0.002}]},
            "models": [{"model": z["base"]}, {"model": z["ft1"]}]},
        "ram": {**f32, "merge_method": "ram", "base_model": z["base"], "models": _models(z, [{}, {}, {}])},
        "ram_epsilon": {
            **f32, "merge_method": "ram", "base_model": z["base"], "parameters": {"epsilon": 0.01},
            "models": _models(z, [{}, {}])},
        "ramplus_tl": {**f32, "merge_method": "ramplus_tl", "base_model": z["base"], "models": _models(z, [{}, {}, {}])},
        "ramplus_tl_base_only": {  # no model besides the base: the base
            **f32, "merge_method": "ramplus_tl", "base_model": z["base"], "models": [{"model": z["base"]}]},
        "ramplus_tl_params": {
            **f32, "merge_method": "ramplus_tl", "base_model": z["base"],
            "parameters": {"r": 0.5, "alpha": [0.6, 2.0], "epsilon": 0.005}, "models": _models(z, [{}, {}])},
    }


NEW_CASES = list(new_recipes({k: k for k in ("base", "ft1", "ft2", "ft3")}))


@pytest.mark.slow
@pytest.mark.parametrize("case", NEW_CASES)
def test_newmethods_match_mergekit(zoo, tmp_path, case):
    recipe = new_recipes(zoo)[case]
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    _compare(str(tmp_path / "mergekit"), str(tmp_path / "hm3jax"))


def _fusion_reference(z, name):
    """mergekit's arcee_fusion importance and threshold for one tensor of ft1 over base."""
    import torch
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    b, m = (torch.from_numpy(read_all(z[k])[name]) for k in ("base", "ft1"))
    imp = _compute_importance(m, b)
    return imp.numpy(), float(DynamicThresholdFusion().calculate_dynamic_threshold(imp))


@pytest.mark.slow
def test_newmethods_arcee_fusion_matches_mergekit(zoo, tmp_path):
    """Equal except at entries whose importance lies within float32 noise of the threshold.

    The importance multiplies |θ − θ_base| by a row's KL divergence, a sum of nearly cancelling terms:
    torch and XLA round it differently (relative differences ~1e-3), so an entry that close to the
    outlier threshold may be kept by one and not the other. Every other entry must agree.
    """
    recipe = {"dtype": "float32", "merge_method": "arcee_fusion", "base_model": zoo["base"],
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 0.3}}]}  # weight: ignored by both
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    with pytest.warns(merging.IgnoredKeyWarning, match="'arcee_fusion' has no parameter 'weight'"):
        merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    base, ft1 = read_all(zoo["base"]), read_all(zoo["ft1"])
    assert sorted(got) == sorted(ref)
    kept = flipped = 0
    for k in ref:
        assert np.all((got[k] == base[k]) | (got[k] == ft1[k])), k  # each entry is one or the other
        kept += int(np.sum((got[k] == ft1[k]) & (ft1[k] != base[k])))
        off = np.abs(ref[k] - got[k]) > ATOL
        if off.any():
            imp, thr = _fusion_reference(zoo, k)
            assert np.all(np.abs(imp[off] - thr) <= 2e-3 * thr), (k, imp[off], thr)
            flipped += int(off.sum())
    assert kept > 1000 and flipped <= 10, (kept, flipped)


@pytest.mark.slow
def test_newmethods_arcee_fusion_large_tensor_statistics():
    """Above 10^6 entries mergekit takes the quartiles of a random sample of 10^6; hm3jax's are exact.

    Same masks up to that sampling noise: on a 1.5M-entry tensor, >= 99.9% of entries agree.
    """
    import jax.numpy as jnp
    import torch
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method
    from mergekit.merge_methods.base import TensorGroup

    rng = np.random.default_rng(3)
    base = rng.normal(size=(1500, 1000)).astype(np.float32)
    model = base + rng.normal(scale=0.05, size=base.shape).astype(np.float32) * (rng.random(base.shape) < 0.7)
    torch.manual_seed(0)
    (ref,) = arcee_fusion_merge_method([TensorGroup.from_tensors(
        [torch.from_numpy(base), torch.from_numpy(model)], base_index=0, name="w")])
    got = np.asarray(merging.METHODS["arcee_fusion"].merge_tensor(jnp.asarray(base), [jnp.asarray(model)]))
    agree = float(np.mean(np.abs(ref.numpy() - got) <= ATOL))
    kept = float(np.mean((got == model) & (model != base)))
    assert agree >= 0.999 and 0.001 < kept < 0.5, (agree, kept)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["multislerp_base_gradient", "multislerp_no_base_unnormalized",
                                  "nearswap_gradient", "ram_epsilon", "ramplus_tl_params", "arcee_fusion"])
def test_newmethods_pytree_api_matches_mergekit(zoo, tmp_path, case):
    """`METHODS[name].merge` over loaded params pytrees gives mergekit's tensors (scalar settings)."""
    import jax.numpy as jnp

    from hm3jax.models.params import hf_name, iter_leaves

    recipe = dict(new_recipes(zoo).get(case) or {
        "dtype": "float32", "merge_method": "arcee_fusion", "base_model": zoo["base"], "models": [{"model": zoo["ft1"]}]})
    shared = {k: (v[-1] if isinstance(v, list) else v) for k, v in recipe.get("parameters", {}).items()}
    models = [m for m in recipe["models"] if m["model"] != recipe.get("base_model")]
    weights = [m["parameters"]["weight"] for m in models if "weight" in m.get("parameters", {})]
    weights = [w[0] if isinstance(w, list) else w for w in weights]  # gradients -> first value everywhere
    for m in models:
        for k, v in (m.get("parameters") or {}).items():
            m["parameters"][k] = v[0] if isinstance(v, list) else v
    recipe["parameters"] = {k: [v] if not isinstance(v, list) else v[-1:] for k, v in shared.items()}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    ref = read_all(str(tmp_path / "mergekit"))
    method = merging.METHODS[recipe["merge_method"]]
    base = load_params(recipe["base_model"]) if "base_model" in recipe else None
    params = [load_params(m["model"]) for m in models]
    merged = method.merge(base, params, jnp.asarray(weights) if weights else None, **shared)
    worst = 0.0
    for path, leaf in iter_leaves(merged):
        leaf = np.asarray(leaf)
        for i, name in ([(i, hf_name(path, i)) for i in range(leaf.shape[0])] if path[0] == "layers"
                        else [(None, hf_name(path))]):
            x = leaf[i] if i is not None else leaf
            diff = np.abs(x - ref[name])
            if case == "arcee_fusion":  # entries at the threshold may flip (see the test above)
                assert np.sum(diff > ATOL) <= 2, name
                diff = np.where(diff > ATOL, 0, diff)
            worst = max(worst, float(diff.max()))
    assert worst <= ATOL, worst


@pytest.mark.slow
def test_newmethods_multislerp_degenerate_matches_mergekit():
    """Weighted directions that cancel: two models fall back to a linear mix (as mergekit); for three,
    mergekit raises and hm3jax gives NaN, which the out-of-core merge refuses as a non-finite tensor."""
    import jax.numpy as jnp
    import torch
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.multislerp import multislerp as mk_multislerp

    rng = np.random.default_rng(5)
    base, d = (np.round(rng.normal(size=(8, 16)) * 8).astype(np.float32) / 8 for _ in range(2))  # exact ±
    ms = [base + d, base - d]  # opposite task vectors, equal weights: unit directions cancel exactly
    (ref,) = mk_multislerp([TensorGroup.from_tensors([torch.from_numpy(x) for x in [base, *ms]], base_index=0)],
                           parameters={"weight": [0.5, 0.5]})
    got = merging.METHODS["multislerp"].merge_tensor(jnp.asarray(base), [jnp.asarray(x) for x in ms],
                                                     jnp.asarray([0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-6)
    three = [base + d, base - d, base + d]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mk_multislerp([TensorGroup.from_tensors([torch.from_numpy(x) for x in [base, *three]], base_index=0)],
                      parameters={"weight": [0.25, 0.5, 0.25]})
    got = merging.METHODS["multislerp"].merge_tensor(jnp.asarray(base), [jnp.asarray(x) for x in three],
                                                     jnp.asarray([0.25, 0.5, 0.25]))
    assert np.all(np.isnan(np.asarray(got)))
