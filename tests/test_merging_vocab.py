"""Tokenizer sources and vocabulary surgery (`tokenizer_source: base | union | <model>`, `tokenizer:
{source, tokens, pad_to_multiple_of}`) against mergekit 0.1.5: the same output tokenizer vocabulary,
config vocab_size and tensors (embedding and head rows rebuilt for the output vocabulary), to 1e-5."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("mergekit")
pytest.importorskip("tokenizers")

from merging_zoo import build_zoo, read_all, run_mergekit

from hm3jax.merging.plan import PlanError
from hm3jax.merging.recipe import RecipeError
from hm3jax.merging.stream import merge_recipe


def _tokenizer(path: str, words: list[str], special: list[str] = ()) -> None:
    """A word-level fast tokenizer over `words` (ids in that order), with added special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}, f)


@pytest.fixture(scope="module")
def vz(tmp_path_factory):
    """base (120 of its 128 rows are tokens), ft1 (20 tokens of its own and a special token), ft2 (the
    base's tokens in another order)."""
    z = build_zoo()
    root = tmp_path_factory.mktemp("vocab")
    words = ["[UNK]"] + [f"w{i}" for i in range(119)]
    vocabs = {"base": (words, []), "ft1": (words[:100] + [f"x{i}" for i in range(20)], ["<|ft1|>"]),
              "ft2": (words[:1] + words[1:][::-1], [])}
    out = {}
    for k, (ws, special) in vocabs.items():
        out[k] = str(root / k)
        shutil.copytree(z[k], out[k])
        _tokenizer(out[k], ws, special)
    return out


def _recipes(v):
    ties = {"merge_method": "ties", "base_model": v["base"], "dtype": "float32",
            "models": [{"model": v["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": v["ft2"], "parameters": {"weight": 0.4, "density": 0.7}}]}
    linear = {"merge_method": "linear", "base_model": v["base"], "dtype": "float32",
              "models": [{"model": v["base"], "parameters": {"weight": 0.2}},
                         {"model": v["ft1"], "parameters": {"weight": 0.5}},
                         {"model": v["ft2"], "parameters": {"weight": 0.3}}]}
    ta = {"merge_method": "task_arithmetic", "base_model": v["base"], "dtype": "float32",
          "models": [{"model": v["ft1"], "parameters": {"weight": 0.7}}, {"model": v["ft2"], "parameters": {"weight": 0.3}}]}
    return {
        "union_ties": {**ties, "tokenizer_source": "union"},
        "base_linear": {**linear, "tokenizer_source": "base"},
        "model_task_arithmetic": {**ta, "tokenizer_source": v["ft1"]},
        "tokens_pad_linear": {**linear, "tokenizer": {
            "source": "union", "pad_to_multiple_of": 64,
            "tokens": {"<new>": {"source": {"kind": "zero"}},
                       "w5": {"source": v["ft1"], "force": True},
                       "x3": {"source": {"kind": "model_token", "model": v["ft1"], "token": "x4"}},
                       "w110": {"source": {"kind": "model_token", "model": v["ft2"], "token_id": 7}}}}},
        "union_no_base_slerp": {"merge_method": "slerp", "base_model": v["base"], "dtype": "float32",
                                "models": [{"model": v["ft1"]}], "parameters": {"t": [0.2, 0.8]},
                                "tokenizer": {"source": "union"}},
    }


CASES = list(_recipes({k: k for k in ("base", "ft1", "ft2")}))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_vocabulary_matches_mergekit(vz, tmp_path, case):
    from transformers import AutoTokenizer

    recipe = _recipes(vz)[case]
    run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    ref, got = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
    cfg_ref, cfg_got = (json.load(open(tmp_path / d / "config.json")) for d in ("mergekit", "hm3jax"))
    assert cfg_got["vocab_size"] == cfg_ref["vocab_size"]
    voc_ref, voc_got = (AutoTokenizer.from_pretrained(tmp_path / d).get_vocab() for d in ("mergekit", "hm3jax"))
    # Same tokens; the base's keep their ids. Tokens a union appends get ids in mergekit's hash-map
    # order (it changes from run to run), so rows are compared token by token.
    assert set(voc_got) == set(voc_ref)
    if case != "model_task_arithmetic":
        assert all(voc_got[t] == i for t, i in voc_ref.items() if i < 120)
    order_ref = np.asarray([voc_ref[t] for t in sorted(voc_ref)] + list(range(len(voc_ref), cfg_ref["vocab_size"])))
    order_got = np.asarray([voc_got[t] for t in sorted(voc_ref)] + list(range(len(voc_ref), cfg_ref["vocab_size"])))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        a, b = (got[k][order_got], ref[k][order_ref]) if k in ("model.embed_tokens.weight", "lm_head.weight") \
            else (got[k], ref[k])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=k)
    assert got["model.embed_tokens.weight"].shape[0] == cfg_got["vocab_size"]


def test_union_vocabulary_and_rows(vz, tmp_path):
    """What the union holds and where a model's missing rows come from (no mergekit needed)."""
    recipe = _recipes(vz)["union_ties"]
    merge_recipe({**recipe, "merge_method": "task_arithmetic",
                  "models": [{"model": vz["ft1"], "parameters": {"weight": 1.0}}]},
                 tmp_path / "out", progress=False)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert len(vocab) == 120 + 20 + 1 and vocab["w5"] == 6 and vocab["<|ft1|>"] >= 120
    got = read_all(str(tmp_path / "out"))["model.embed_tokens.weight"]
    ft1, base = (read_all(vz[k])["model.embed_tokens.weight"] for k in ("ft1", "base"))
    # base + (ft1 - base) row by row: a token only ft1 has gets ft1's row in the base too, and one ft1
    # lacks gets the base's row in ft1, so both come out unchanged.
    np.testing.assert_allclose(got[vocab["x3"]], ft1[103], atol=1e-7)
    np.testing.assert_allclose(got[vocab["w110"]], base[111], atol=1e-7)
    np.testing.assert_allclose(got[vocab["w7"]], ft1[8], atol=1e-7)


@pytest.mark.parametrize("tokenizer,expect", [
    ({"source": "union", "pad_to_multiple_of": 0}, r"pad_to_multiple_of: expected a positive integer"),
    ({"tokens": {"a": {"source": {"kind": "bogus"}}}}, r"tokens\['a'\]\.source: expected a model path"),
    ({"tokens": {"a": {"source": {"kind": "model_token", "model": "m", "token": "b", "token_id": 1}}}},
     r"tokens\['a'\]\.source: expected"),
])
def test_bad_tokenizer_settings_name_the_key(vz, tokenizer, expect):
    from hm3jax.merging.recipe import load_recipe

    with pytest.raises(RecipeError, match=expect):
        load_recipe({**_recipes(vz)["base_linear"], "tokenizer_source": None, "tokenizer": tokenizer})


def test_token_source_outside_the_merge(vz, tmp_path):
    recipe = {**_recipes(vz)["union_ties"], "tokenizer_source": None,
              "tokenizer": {"source": "union", "tokens": {"x1": {"source": "/nonexistent/m"}}}}
    with pytest.raises(PlanError, match=r"tokens\['x1'\]: model /nonexistent/m is not an input of the merge"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
