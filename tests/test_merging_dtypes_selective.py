"""float16/bfloat16 recipes of the newer methods (arcee_fusion, nearswap, ram, ramplus_tl, multislerp)
against mergekit 0.1.5, in test_merging_dtypes.py's style: mergekit runs them in the 16-bit dtype (each
torch op computed in float32 and rounded), and so does hm3jax."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mergekit")

from merging_zoo import build_zoo, read_all, run_mergekit
from test_merging_dtypes import DTYPES, _models

from hm3jax.merging.stream import merge_recipe


@pytest.fixture(scope="module")
def zoo():
    return build_zoo()


def recipes(z) -> dict[str, dict]:
    return {
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": z["base"], "models": _models(z, [{}])},
        "nearswap": {"merge_method": "nearswap", "base_model": z["base"], "parameters": {"t": 0.01},
                     "models": _models(z, [{}])},
        "ram": {"merge_method": "ram", "base_model": z["base"], "parameters": {"epsilon": 1e-3},
                "models": _models(z, [{}, {}, {}])},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": z["base"], "parameters": {"epsilon": 1e-3},
                       "models": _models(z, [{}, {}, {}])},
        "multislerp": {"merge_method": "multislerp", "base_model": z["base"],
                       "models": _models(z, [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}])},
    }


# ulps of each tensor's largest entry by which hm3jax may differ (0: bit for bit)
ULPS = {"arcee_fusion": 0, "nearswap": 0, "ram": 0, "ramplus_tl": 0, "multislerp": 2}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(ULPS))
def test_16bit_selective_recipe_matches_mergekit(zoo, tmp_path, dtype, method):
    recipe = {**recipes(zoo)[method], "dtype": dtype}
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    assert sorted(got) == sorted(ref)
    eps = 2.0 ** -10 if dtype == "float16" else 2.0 ** -7
    # arcee_fusion and ramplus_tl end in float32 in mergekit (a float32 mask or gain), which it writes
    # as float32 tensors; hm3jax writes them rounded to `dtype` (what transformers loads them as)
    ref = {n: v.astype(DTYPES[dtype]).astype(np.float32) for n, v in ref.items()}
    for name in ref:
        if method == "arcee_fusion":
            # bit for bit, except entries whose importance lies within rounding of the outlier
            # threshold (a handful per model; which side they fall on depends on the CPU's rounding)
            differ = got[name] != ref[name]
            assert differ.sum() <= max(2, differ.size // 1000), (name, int(differ.sum()))
        elif ULPS[method] == 0:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        else:
            assert np.abs(got[name] - ref[name]).max() <= ULPS[method] * eps * np.abs(ref[name]).max(), name

