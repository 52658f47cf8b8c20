"""`chat_template` (a named template, "auto", a literal Jinja string) against mergekit 0.1.5: the same
output tokenizer (vocabulary and chat template as transformers loads them) and tensors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("mergekit")
pytest.importorskip("tokenizers")

from merging_zoo import build_zoo, read_all
from test_merging_vocab import _tokenizer

from hm3jax.merging.recipe import RecipeError, load_recipe
from hm3jax.merging.stream import merge_recipe


@pytest.fixture(scope="module")
def cz(tmp_path_factory):
    """base and ft1 with a tokenizer each (ft1's carries a chat template), ft2 without one."""
    z = build_zoo()
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for k in ("base", "ft1", "ft2"):
        out[k] = str(root / k)
        shutil.copytree(z[k], out[k])
    words = ["[UNK]"] + [f"w{i}" for i in range(119)]
    _tokenizer(out["base"], words)
    _tokenizer(out["ft1"], words)
    cfg = os.path.join(out["ft1"], "tokenizer_config.json")
    with open(cfg) as f:
        c = json.load(f)
    c["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    with open(cfg, "w") as f:
        json.dump(c, f)
    return out


def _recipe(z, template, base="base"):
    return {"merge_method": "linear", "base_model": z[base], "dtype": "bfloat16", "chat_template": template,
            "models": [{"model": z[base], "parameters": {"weight": 0.5}},
                       {"model": z["ft2"], "parameters": {"weight": 0.5}}]}


def run_mergekit(recipe: dict, out: str) -> None:
    """mergekit in-process, copying the tokenizer (as `mergekit-yaml` does by default)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), out,
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, random_seed=0))


def _loaded(path):
    from transformers import AutoTokenizer

    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
    tok = AutoTokenizer.from_pretrained(path)
    return tok.get_vocab(), tok.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "llama3", "{{messages[0]['content']}}", "auto"])
def test_chat_template_matches_mergekit(cz, tmp_path, template):
    recipe = _recipe(cz, template, base="ft1" if template == "auto" else "base")
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = _loaded(str(tmp_path / "mergekit")), _loaded(str(tmp_path / "hm3jax"))
    assert ref is not None and got == ref
    assert got[1] and ("<|im_start|>" in got[1] if template == "chatml" else True)
    a, b = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    assert all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_chat_template_with_tokenizer_source(cz, tmp_path):
    recipe = {**_recipe(cz, "chatml"), "tokenizer_source": "base"}
    recipe["models"] = [{"model": cz["base"], "parameters": {"weight": 0.5}},
                        {"model": cz["ft1"], "parameters": {"weight": 0.5}}]
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    assert _loaded(str(tmp_path / "hm3jax")) == _loaded(str(tmp_path / "mergekit"))


def test_chat_template_without_tokenizer_warns(cz, tmp_path):
    recipe = {**_recipe(cz, "chatml"), "base_model": cz["ft2"]}
    with pytest.warns(UserWarning, match="chat_template: no tokenizer"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out" / "tokenizer.json")


@pytest.mark.parametrize("bad", ["nosuchtemplate", "{{ x }}", 3])
def test_bad_chat_template_is_a_one_line_error(cz, bad):
    with pytest.raises(RecipeError, match="chat_template") as e:
        load_recipe(_recipe(cz, bad))
    assert "\n" not in str(e.value)
