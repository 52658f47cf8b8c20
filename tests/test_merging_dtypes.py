"""float16/bfloat16 recipes (`dtype: float16`, as mergekit's examples are written) give mergekit 0.1.5's
tensors: the task-arithmetic family, model_stock, nuslerp, sce and karcher do their arithmetic in the
16-bit dtype as torch does, linear and slerp in float32. `compute_dtype="float32"` keeps float32 arithmetic (one rounding at the end)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("mergekit")

from merging_zoo import build_zoo, read_all, run_mergekit

from hm3jax.merging.stream import merge_recipe

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def zoo():
    return build_zoo()


def _models(z, params):
    return [{"model": z[f"ft{i + 1}"], "parameters": p} for i, p in enumerate(params)]


def recipes(z) -> dict[str, dict]:
    return {
        "linear": {"merge_method": "linear", "models": _models(z, [{"weight": 0.3}, {"weight": [0.5, 0.1]},
                                                                   {"weight": 0.7}])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": z["base"],
                            "parameters": {"lambda": 0.8, "normalize": True},
                            "models": _models(z, [{"weight": 0.3}, {"weight": 0.5}, {"weight": -0.2}])},
        "ties": {"merge_method": "ties", "base_model": z["base"],
                 "models": _models(z, [{"weight": 0.3, "density": 0.5}, {"weight": 0.5, "density": 0.7},
                                       {"weight": 0.7, "density": 0.3}])},
        "slerp": {"merge_method": "slerp", "base_model": z["base"], "models": _models(z, [{}]),
                  "parameters": {"t": [0, 0.3, 1]}},
        "model_stock": {"merge_method": "model_stock", "base_model": z["base"], "models": _models(z, [{}, {}, {}])},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": z["base"],
                                    "parameters": {"filter_wise": True}, "models": _models(z, [{}, {}, {}])},
        "nuslerp": {"merge_method": "nuslerp", "base_model": z["base"],
                    "models": _models(z, [{"weight": 0.3}, {"weight": [0.9, 0.1]}])},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                 "models": _models(z, [{"weight": 0.6}, {"weight": 0.4}])},
        "sce": {"merge_method": "sce", "base_model": z["base"], "models": _models(z, [{}, {}, {}])},
        "karcher": {"merge_method": "karcher", "models": _models(z, [{}, {}, {}])},
        "dare_ties": {"merge_method": "dare_ties", "base_model": z["base"],
                      "models": _models(z, [{"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.6}])},
    }


def _ulps(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """Distance in units of the last place of `dtype` (same-sign values; a float16/bfloat16 pair)."""
    ia = a.astype(dtype).view(np.int16).astype(np.int64)
    ib = b.astype(dtype).view(np.int16).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFF), ib)
    return np.abs(ia - ib)


def _trim_ties(base: dict, recipe: dict, name: str, dtype) -> np.ndarray:
    """Entries where some model's |τ_i| equals the k-th largest magnitude of its tensor: there the
    trim keeps an arbitrary subset of the tied entries (torch's argsort leaves their order unspecified
    for large tensors; hm3jax keeps the lowest indices), so results may differ; elsewhere they may not."""
    b = base[name].astype(dtype).astype(np.float32)
    out = np.zeros(b.shape, bool)
    for m in recipe["models"]:
        tau = np.abs((read_all(m["model"])[name].astype(dtype).astype(np.float32) - b).astype(dtype))
        tau = tau.astype(np.float32)
        k = max(1, int(m["parameters"]["density"] * tau.size))
        out |= tau == np.sort(tau.reshape(-1))[::-1][k - 1]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "model_stock",
                                    "model_stock_filter_wise", "nuslerp", "nuslerp_rows_no_base", "sce",
                                    "karcher"])
def test_16bit_recipe_matches_mergekit(zoo, tmp_path, dtype, method):
    recipe = {**recipes(zoo)[method], "dtype": dtype}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    assert sorted(got) == sorted(ref)
    npdt = DTYPES[dtype]
    base = read_all(zoo["base"])
    differing = 0
    for name in ref:
        if method == "karcher":  # float32 norms summed in another order steer the iteration: <= 2 ulps
            eps = 2.0 ** -10 if dtype == "float16" else 2.0 ** -7  # of the tensor's largest entry
            assert np.abs(got[name] - ref[name]).max() <= 2 * eps * np.abs(ref[name]).max(), name
        elif method not in ("slerp", "ties"):  # exact
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        elif method == "slerp":  # float32 angle from differently ordered sums: <= 1 ulp
            assert _ulps(got[name], ref[name], npdt).max() <= 1, name
        else:
            differ = got[name] != ref[name]
            assert not (differ & ~_trim_ties(base, recipe, name, npdt)).any(), name
            differing += int(differ.sum())
    assert differing <= 0.005 * sum(v.size for v in ref.values())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_16bit_dare_ties_statistics_match_mergekit(zoo, tmp_path, dtype):
    """Random drops differ in their draws (torch vs JAX); what they keep and how it is scaled agree."""
    recipe = {**recipes(zoo)["dare_ties"], "dtype": dtype}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    base = read_all(zoo["base"])
    for name in ref:
        if ref[name].size < 4096:
            continue
        b = base[name].astype(DTYPES[dtype]).astype(np.float32)
        moved_ref, moved_got = np.mean(ref[name] != b), np.mean(got[name] != b)
        assert abs(moved_ref - moved_got) < 0.03, name
        s_ref, s_got = np.abs(ref[name] - b).sum(), np.abs(got[name] - b).sum()
        assert abs(s_ref - s_got) < 0.1 * s_ref, name


@pytest.mark.slow
def test_compute_dtype_float32_is_float32_arithmetic(zoo, tmp_path):
    """compute_dtype="float32": the inputs rounded to `dtype`, float32 arithmetic, one rounding at the
    end: mergekit's tensors for the same recipe at `dtype: float32` on float16 copies of the inputs,
    with `out_dtype: float16`."""
    from safetensors.numpy import save_file

    copies = {}
    for k in ("base", "ft1", "ft2", "ft3"):
        d = tmp_path / k
        d.mkdir()
        save_file({n: v.astype(np.float16) for n, v in read_all(zoo[k]).items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(open(f"{zoo[k]}/config.json").read())
        copies[k] = str(d)
    recipe = {**recipes(zoo)["task_arithmetic"], "dtype": "float16"}
    merge_recipe(recipe, tmp_path / "f32", progress=False, compute_dtype="float32")
    merge_recipe(recipe, tmp_path / "f16", progress=False)
    ref_recipe = {**recipes(copies)["task_arithmetic"], "dtype": "float32", "out_dtype": "float16"}
    run_mergekit(ref_recipe, str(tmp_path / "mergekit"))
    ref, got, native = (read_all(str(tmp_path / d)) for d in ("mergekit", "f32", "f16"))
    assert max(_ulps(got[n], ref[n], np.float16).max() for n in ref) <= 1
    assert any((got[n] != native[n]).any() for n in ref)  # the option changes the arithmetic
    import yaml

    from hm3jax.merging.__main__ import main

    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "r.yml"), str(tmp_path / "cli"), "--quiet", "--compute-dtype", "float32"]) == 0
    cli = read_all(str(tmp_path / "cli"))
    assert all(np.array_equal(cli[n], got[n]) for n in got)
    with pytest.raises(ValueError, match="compute_dtype 'float64'"):
        merge_recipe(recipe, tmp_path / "bad", progress=False, compute_dtype="float64")
