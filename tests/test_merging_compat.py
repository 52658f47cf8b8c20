"""Recipe keys mergekit 0.1.5 ignores are ignored here too, with one warning each naming the key (and
the method, for a parameter); `strict` / `--strict` refuses them. Keys mergekit acts on but hm3jax
cannot are refused either way. mergekit's own behaviour (what its pydantic config accepts, which
parameters each method declares, that it ignores the rest) is checked against the installed package."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import yaml

from hm3jax import merging
from hm3jax.merging.__main__ import main
from hm3jax.merging.recipe import IgnoredKeyWarning, RecipeError, load_recipe


def _slerp(**over):
    r = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
         "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]}
    r.update(over)
    return r


def _models(method, params=None, **over):
    r = {"merge_method": method, "base_model": "a",
         "models": [{"model": "b", "parameters": params or {}}, {"model": "c", "parameters": params or {}}]}
    r.update(over)
    return r


def _with(recipe, path, key, value):
    """recipe with `key: value` set in the mapping at `path` (a list of keys / indices)."""
    d = recipe
    for p in path:
        d = d[p]
    d[key] = value
    return recipe


# (recipe, warning regex, strict error regex)
IGNORED = {
    "slerp_weight": (_slerp(parameters={"t": 0.5, "weight": 0.5}),
                     r"recipe: parameters: merge method 'slerp' has no parameter 'weight'; ignoring it, as "
                     r"mergekit does \(its parameters: t\)",
                     r"recipe: parameters: merge method 'slerp' has no parameter 'weight'; its parameters: t "
                     r"\(strict: mergekit would ignore it\)"),
    "model_stock_weight": (_models("model_stock", {"weight": 1.0}),
                           r"models\[[01]\]\.parameters: merge method 'model_stock' has no parameter 'weight'",
                           r"models\[0\]\.parameters: merge method 'model_stock' has no parameter 'weight'; "
                           r"its parameters: filter_wise"),
    "karcher_weight": (_models("karcher", {"weight": [0.2, 0.8]}),
                       r"merge method 'karcher' has no parameter 'weight'",
                       r"merge method 'karcher' has no parameter 'weight'; its parameters: max_iter, tol"),
    "sce_weight": (_models("sce", {"weight": [{"filter": "mlp", "value": 0.5}]}),
                   r"merge method 'sce' has no parameter 'weight'",
                   r"merge method 'sce' has no parameter 'weight'; its parameters: select_topk, int8_mask"),
    "arcee_fusion_weight": ({"merge_method": "arcee_fusion", "base_model": "a",
                             "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
                            r"merge method 'arcee_fusion' has no parameter 'weight'.*\(its parameters: none\)",
                            r"merge method 'arcee_fusion' has no parameter 'weight'; its parameters: none"),
    "source_param": (_with(_slerp(), ["slices", 0, "sources", 1], "parameters", {"density": 0.5}),
                     r"slices\[0\]\.sources\[1\]\.parameters: merge method 'slerp' has no parameter 'density'",
                     r"slices\[0\]\.sources\[1\]\.parameters: merge method 'slerp' has no parameter 'density'"),
    "top_key": (_slerp(notes="my merge"),
                r"recipe: ignoring key 'notes' \(mergekit ignores unknown keys\); supported keys: merge_method",
                r"recipe: unknown key 'notes'; supported keys: merge_method, .* \(strict: mergekit ignores "
                r"unknown keys\)"),
    "model_key": (_with(_models("ties", {"weight": 1.0}), ["models", 1], "revision", "main"),
                  r"recipe: models\[1\]: ignoring key 'revision' .*; supported keys: model, parameters",
                  r"recipe: models\[1\]: unknown key 'revision'; supported keys: model, parameters"),
    "slice_residual_weight": (_with(_slerp(), ["slices", 0], "residual_weight", 0.5),
                              r"slices\[0\]: ignoring key 'residual_weight' \(mergekit declares it but never "
                              r"uses it\)",
                              r"slices\[0\]: unknown key 'residual_weight'.*\(strict: mergekit declares it"),
    "source_key": (_with(_slerp(), ["slices", 0, "sources", 0], "weight", 1),
                   r"slices\[0\]\.sources\[0\]: ignoring key 'weight'",
                   r"slices\[0\]\.sources\[0\]: unknown key 'weight'; supported keys: model, layer_range"),
    "filter_typo": (_slerp(parameters={"t": [{"filt": "mlp", "value": 0.3}]}),
                    r"parameters\.t\[0\]: ignoring key 'filt' \(mergekit ignores unknown keys; with no 'filter' "
                    r"the entry matches every tensor\)",
                    r"parameters\.t\[0\]: unknown key 'filt'; supported keys: value, filter"),
    "tokenizer_key": (_slerp(tokenizer={"source": "base", "extra": 1}),
                      r"tokenizer: ignoring key 'extra'",
                      r"tokenizer: unknown key 'extra'; supported keys: source, tokens, pad_to_multiple_of"),
    "model_ref_key": (_slerp(base_model={"model": "a", "revision": "main"}),
                      r"base_model: ignoring key 'revision'",
                      r"base_model: unknown key 'revision'; supported keys: model"),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_ignored_key_warns_and_strict_refuses(case):
    recipe, warn, error = IGNORED[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(recipe)
    msgs = [str(w.message) for w in caught if issubclass(w.category, IgnoredKeyWarning)]
    assert msgs and all("\n" not in m and re.search(warn, m) for m in msgs), msgs  # one per place given
    with pytest.raises(RecipeError, match=error):
        load_recipe(recipe, strict=True)


def test_ignored_parameter_is_dropped():
    with pytest.warns(IgnoredKeyWarning):
        r = load_recipe(_slerp(parameters={"t": 0.5, "weight": 0.5}))
    assert dict(r.parameters) == {"t": 0.5}


def test_ignored_parameter_value_must_still_be_a_setting():
    """mergekit validates the form of every setting, also under a name the method does not use."""
    with pytest.raises(RecipeError, match=r"parameters\.weight: a filtered setting needs a 'value'"):
        load_recipe(_slerp(parameters={"t": 0.5, "weight": {"x": 1}}))


REFUSED = {  # mergekit acts on these; hm3jax cannot (or the value is invalid), so it refuses them
    "modules": (_slerp(modules={}), r"key 'modules' is not supported \(per-module recipes"),
    "chat_template": (_slerp(chat_template="nosuch"), r"key 'chat_template': 'nosuch' is not a named template"),
    "lora": (_slerp(base_model={"model": "a", "lora": "l"}), r"base_model: key 'lora' is not supported"),
    "override_architecture": (_slerp(base_model={"model": "a", "override_architecture": "X"}),
                              r"key 'override_architecture' is not supported"),
}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_mergekit_uses_are_refused(case, strict):
    recipe, error = REFUSED[case]
    with pytest.raises(RecipeError, match=error):
        load_recipe(recipe, strict=strict)


def test_in_memory_api_stays_strict():
    with pytest.raises(ValueError, match=r"merge method 'slerp' has no parameter\(s\) weight"):
        merging.METHODS["slerp"].resolve({"t": 0.5, "weight": 1.0})


# ------------------------------------------------------------------------------- CLI and mergekit
@pytest.fixture(scope="session")
def zoo():
    from merging_zoo import build_zoo

    return build_zoo()


def _cli_recipe(z):
    return {"merge_method": "slerp", "base_model": z["base"], "dtype": "float32", "notes": "x",
            "parameters": {"t": 0.4, "weight": 0.5},
            "slices": [{"sources": [{"model": z["base"], "layer_range": [0, 4]},
                                    {"model": z["ft1"], "layer_range": [0, 4]}], "residual_weight": 0.1}]}


@pytest.mark.slow
def test_cli_warns_per_ignored_key_and_strict_refuses(zoo, tmp_path, capsys):
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump(_cli_recipe(zoo)))
    assert main([str(cfg), str(tmp_path / "strict"), "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*recipe\.yml: unknown key 'notes'; supported keys: .* \(strict: mergekit "
                        r"ignores unknown keys\)\n", err), err
    assert os.listdir(tmp_path) == ["recipe.yml"]
    assert main([str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(x.startswith("warning: ") for x in lines), lines
    assert re.search(r"recipe\.yml: ignoring key 'notes'", lines[0])
    assert re.search(r"slices\[0\]: ignoring key 'residual_weight'", lines[1])
    assert re.search(r"parameters: merge method 'slerp' has no parameter 'weight'; ignoring it", lines[2])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["slerp", "model_stock", "karcher", "sce", "arcee_fusion", "ram"])
def test_mergekit_ignores_the_same_keys(zoo, tmp_path, method):
    """With `weight` (and unknown keys) added where the method declares none, mergekit's tensors are
    those of the recipe without them, and hm3jax's equal mergekit's."""
    import numpy as np
    from merging_zoo import read_all, run_mergekit

    z = zoo
    models = {"slerp": ["ft1"], "arcee_fusion": ["ft1"]}.get(method, ["ft1", "ft2", "ft3"])
    plain = {"merge_method": method, "dtype": "float32", "base_model": z["base"],
             "models": [{"model": z[m]} for m in models]}
    if method == "slerp":
        plain["parameters"] = {"t": 0.3}
    if method == "karcher":
        plain.pop("base_model")
    noisy = {**plain, "comment": "x", "parameters": {**plain.get("parameters", {}), "weight": 0.5},
             "models": [{"model": z[m], "parameters": {"weight": [0.1, 0.9]}, "note": 1} for m in models]}
    run_mergekit(plain, str(tmp_path / "plain"))
    run_mergekit(noisy, str(tmp_path / "noisy"))
    with pytest.warns(IgnoredKeyWarning, match=f"merge method '{method}' has no parameter 'weight'"):
        merging.merge_recipe(noisy, tmp_path / "hm3jax", progress=False)
    ref, ign, got = (read_all(str(tmp_path / d)) for d in ("plain", "noisy", "hm3jax"))
    assert sorted(ref) == sorted(ign) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(ign[k], ref[k], err_msg=k)
        if method == "arcee_fusion":  # entries at the outlier threshold may flip (test_merging_parity)
            assert np.sum(np.abs(got[k] - ref[k]) > 1e-5) <= 2, k
        else:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.slow
def test_mergekit_accepts_unknown_keys_and_declares_no_parameter_we_lack():
    """What makes ignoring right: mergekit's config drops unknown keys at every level (pydantic's
    default), refuses a malformed setting even under an unknown name, and every mergekit method is
    registered here with at least mergekit's parameters and the same base policy. So a parameter
    hm3jax does not declare is one mergekit never reads."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods.registry import registered_methods

    for case in ("top_key", "model_key", "slice_residual_weight", "source_key", "filter_typo", "tokenizer_key",
                 "model_ref_key", "slerp_weight"):
        MergeConfiguration.model_validate(IGNORED[case][0])  # accepted
    with pytest.raises(ValueError):
        MergeConfiguration.model_validate(_slerp(parameters={"t": 0.5, "weight": {"x": 1}}))
    base_policy = {"required": "required", "optional": "optional", "ignored": "ignored"}
    for m in registered_methods():
        ours = merging.METHODS[m.spec.name]
        missing = {p.name for p in m.spec.parameters} - set(ours.params)
        assert not missing, (m.spec.name, missing)
        assert base_policy[m.spec.contract.base.value] == ours.base, m.spec.name
