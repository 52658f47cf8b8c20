"""hm3jax.export: a layer path under a shell becomes a plain HF checkpoint that transformers runs
with the logits of forward_path, with its solution record and mergekit recipes that rebuild it."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from hm3jax.cost import path_cost
from hm3jax.export import (
    PATH_RECIPE,
    SOLUTION_FILE,
    UPPER_OUTPUT,
    UPPER_RECIPE,
    ExportError,
    export_path,
    passthrough_recipe,
)
from hm3jax.io import OutputExistsError, load_pretrained, save_pretrained
from hm3jax.io.atomic import UnsafeOutputError
from hm3jax.models import ModelConfig, build_pool, forward_path, init_params, shell_of
from hm3jax.objectives import VOCAB_SIZE, save_tokenizer
from hm3jax.search.upper import merge_for_preference

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
EXPERTS = ("math", "code", "translation")
PREFERENCE = [0.5, 0.3, 0.2]
UPPER = {"method": "task_arithmetic", "density": 1.0, "scale": 0.9, "seed": 0}


def _random(params: dict, seed: int, scale: float) -> dict:
    """`params` plus normal(scale) noise (numpy: no per-leaf XLA compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape, np.float32), params)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(models {base, experts, merge}, checkpoints {base, experts}) of a small random family."""
    root = tmp_path_factory.mktemp("family")
    base = _random(init_params(CFG, jax.random.key(0)), 1, 0.05)
    experts = {n: _random(base, 10 + i, 0.02) for i, n in enumerate(EXPERTS)}
    merge = jax.jit(merge_for_preference, static_argnums=0)(
        UPPER["method"], base, [experts[n] for n in EXPERTS], jnp.asarray(PREFERENCE), jax.random.key(0),
        UPPER["density"], UPPER["scale"])
    tok = save_tokenizer(root / "tokenizer")
    models = {"base": base, **experts}
    ckpts = {n: save_pretrained(root / n, CFG, p, tokenizer_from=tok) for n, p in models.items()}
    return {**models, "merge": merge}, ckpts


def _solution(path, shell):
    return {"preference": PREFERENCE, "upper": UPPER, "path": [list(s) for s in path], "shell": shell,
            "scores": {"search": [0.1, 0.2, 0.3], "heldout": [0.1, 0.2, 0.3]},
            "cost": path_cost(CFG, path, 64).to_dict(), "dominated": False}


PATHS = {
    "full_length_mixed": ([("math", 0), ("merge", 1), ("code", 2)], "merge"),
    "shorter_repeated": ([("code", 1), ("code", 1)], "math"),
    "longer_than_L": ([("merge", 2), ("math", 0), ("translation", 1), ("merge", 0)], "translation"),
}


@pytest.mark.parametrize("case", sorted(PATHS))
@pytest.mark.slow
def test_export_matches_forward_path_in_transformers(family, tmp_path, case):
    import torch
    from transformers import AutoModelForCausalLM

    models, ckpts = family
    path, shell = PATHS[case]
    out = export_path(tmp_path / "export", CFG, models, path, shell, solution=_solution(path, shell),
                      checkpoints=ckpts, experts=EXPERTS)
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["num_hidden_layers"] == len(path)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    names = list(models)
    pool = build_pool([models[n] for n in names], names)
    want = np.asarray(forward_path(CFG, shell_of(models[shell]), pool, pool.path(path), jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the cost's parameter count is the exported model's
    assert model.num_parameters() == path_cost(CFG, path, 64).parameters
    record = json.load(open(os.path.join(out, SOLUTION_FILE)))
    assert record["path"] == [list(s) for s in path] and record["shell"] == shell
    # the exported checkpoint reads back through hm3jax with the stacked slices
    cfg2, params2 = load_pretrained(out)
    assert cfg2.num_hidden_layers == len(path)
    m, l = path[-1]
    np.testing.assert_array_equal(np.asarray(params2["layers"]["mlp"]["up_proj"]["weight"][-1]),
                                  np.asarray(models[m]["layers"]["mlp"]["up_proj"]["weight"][l]))


def test_recipes_name_the_right_slices(family, tmp_path):
    models, ckpts = family
    path, shell = [("math", 0), ("math", 1), ("merge", 1), ("code", 2)], "merge"
    out = export_path(tmp_path / "e", CFG, models, path, shell, solution=_solution(path, shell),
                      checkpoints=ckpts, experts=EXPERTS)
    recipe = yaml.safe_load(open(os.path.join(out, PATH_RECIPE)))
    assert recipe["merge_method"] == "passthrough"
    got = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in recipe["slices"]]
    # consecutive math layers are one slice; the shell (merge) gets empty edge slices
    assert got == [(UPPER_OUTPUT, [0, 0]), (ckpts["math"], [0, 2]), (UPPER_OUTPUT, [1, 2]),
                   (ckpts["code"], [2, 3]), (UPPER_OUTPUT, [0, 0])]
    upper = yaml.safe_load(open(os.path.join(out, UPPER_RECIPE)))
    assert upper["merge_method"] == "task_arithmetic" and upper["base_model"] == ckpts["base"]
    assert upper["parameters"]["lambda"] == UPPER["scale"]
    assert [m["model"] for m in upper["models"]] == [ckpts[n] for n in EXPERTS]
    assert [m["parameters"]["weight"] for m in upper["models"]] == PREFERENCE
    assert "exactly" in open(os.path.join(out, UPPER_RECIPE)).read()
    readme = open(os.path.join(out, "README.md")).read()
    assert f"mergekit-yaml {UPPER_RECIPE}" in readme
    # no edge slice when the path starts and ends in the shell model
    r = passthrough_recipe([("code", 0), ("math", 2), ("code", 1)], "code", ckpts)
    assert [s["sources"][0]["layer_range"] for s in r["slices"]] == [[0, 1], [2, 3], [1, 2]]


def test_dare_recipe_says_it_is_not_exact(family, tmp_path):
    models, ckpts = family
    path, shell = [("merge", 0)], "merge"
    sol = {**_solution(path, shell), "upper": {"method": "dare_ties", "density": 0.5, "scale": 1.0, "seed": 3}}
    out = export_path(tmp_path / "e", CFG, models, path, shell, solution=sol, checkpoints=ckpts,
                      experts=EXPERTS)
    text = open(os.path.join(out, UPPER_RECIPE)).read()
    assert "NOT reproduce" in text
    assert all(m["parameters"]["density"] == 0.5 for m in yaml.safe_load(text)["models"])


def _read_all(path):
    from hm3jax.io import CheckpointReader

    with CheckpointReader(path) as r:
        return {n: np.array(r.get(n), np.float32) for n in r.names}


@pytest.mark.slow
def test_mergekit_rebuilds_a_task_arithmetic_export(family, tmp_path, monkeypatch):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    models, ckpts = family
    path, shell = [("code", 2), ("merge", 0), ("merge", 1), ("math", 1)], "merge"
    out = export_path(tmp_path / "e", CFG, models, path, shell, solution=_solution(path, shell),
                      checkpoints=ckpts, experts=EXPERTS)
    monkeypatch.chdir(out)  # the path recipe reads the upper merge relative to the export
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    for recipe, target in ((UPPER_RECIPE, UPPER_OUTPUT), (PATH_RECIPE, str(tmp_path / "rebuilt"))):
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(recipe))), target, opts)
    want, got = _read_all(out), _read_all(str(tmp_path / "rebuilt"))
    assert sorted(got) == sorted(want)
    worst = max(float(np.max(np.abs(want[k] - got[k]))) for k in want)
    assert worst <= 1e-5


def test_hm3jax_merge_rebuilds_a_path_of_experts(family, tmp_path):
    from hm3jax.merging.stream import merge_recipe

    models, ckpts = family
    path, shell = [("code", 0), ("math", 2), ("math", 2), ("code", 1)], "code"
    out = export_path(tmp_path / "e", CFG, models, path, shell, checkpoints=ckpts)
    merge_recipe(os.path.join(out, PATH_RECIPE), tmp_path / "rebuilt", progress=False)
    want, got = _read_all(out), _read_all(str(tmp_path / "rebuilt"))
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(want[k], got[k]) for k in want)


BAD_PATHS = {
    "unknown model": ([("physics", 0)], "math", "physics"),
    "layer out of range": ([("math", 3)], "math", "layer out of range"),
    "negative layer": ([("math", -1)], "math", "layer out of range"),
    "empty path": ([], "math", "empty"),
    "only skips": ([None, None], "math", "empty"),
    "not a pair": ([("math",)], "math", "pair"),
    "unknown shell": ([("math", 0)], "physics", "shell model 'physics'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_path_is_refused_and_nothing_written(family, tmp_path, case):
    models, ckpts = family
    path, shell, words = BAD_PATHS[case]
    with pytest.raises(ExportError, match=words):
        export_path(tmp_path / "e", CFG, models, path, shell, checkpoints=ckpts)
    assert os.listdir(tmp_path) == []


def test_bad_output_dirs_are_refused_and_nothing_written(family, tmp_path):
    models, ckpts = family
    path, shell = [("math", 0)], "math"
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_path(tmp_path / "exists", CFG, models, path, shell, checkpoints=ckpts)
    assert os.listdir(tmp_path / "exists") == []
    before = {n: sorted(os.listdir(p)) for n, p in ckpts.items()}
    root = os.path.dirname(ckpts["math"])
    for bad, how in ((ckpts["math"], "is the input"), (os.path.join(ckpts["code"], "sub"), "inside"),
                     (root, "contains")):
        with pytest.raises(UnsafeOutputError, match=how):
            export_path(bad, CFG, models, path, shell, checkpoints=ckpts, overwrite=True)
    assert {n: sorted(os.listdir(p)) for n, p in ckpts.items()} == before
    # a solution whose path disagrees with the exported one
    with pytest.raises(ExportError, match="differs"):
        export_path(tmp_path / "e", CFG, models, path, shell, solution={"path": [["code", 0]]})
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_cost_on_a_known_config():
    from hm3jax.cost import model_cost

    # D=8, F=16, 2 heads of 4, 1 kv head, V=100: a layer has 576 projection weights + 16 norm weights
    cfg = ModelConfig(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=16,
                      num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1)
    c = path_cost(cfg, [("a", 0), None, ("b", 4), ("a", 0)], seq_len=10)
    assert c.layers == 3
    assert c.parameters == 800 + 8 + 800 + 3 * 592
    # 2 x (3 x 576 + 100 x 8) matmul FLOPs + 4 x 3 layers x 10 positions x 2 heads x 4 dims
    assert c.flops_per_token == 2 * (3 * 576 + 800) + 4 * 3 * 10 * 2 * 4
    tied = model_cost(cfg.replace(tie_word_embeddings=True), 3, 10)
    assert tied.parameters == c.parameters - 800 and tied.flops_per_token == c.flops_per_token
    windowed = model_cost(cfg.replace(model_type="mistral", sliding_window=4), 3, 10)
    assert windowed.flops_per_token == 2 * (3 * 576 + 800) + 4 * 3 * 4 * 2 * 4
    assert c.to_dict() == {"layers": 3, "parameters": c.parameters, "flops_per_token": c.flops_per_token}
    with pytest.raises(ValueError, match="seq_len"):
        model_cost(cfg, 3, 0)


@pytest.mark.slow
def test_mergekit_yaml_cli_runs_the_readme_commands(family, tmp_path):
    """The README's two commands, through the real `mergekit-yaml` (model card, tokenizer copy), offline."""
    import shutil
    import subprocess

    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml not installed")
    models, ckpts = family
    path, shell = [("math", 0), ("merge", 1), ("code", 2)], "merge"
    out = export_path(tmp_path / "e", CFG, models, path, shell, solution=_solution(path, shell),
                      checkpoints=ckpts, experts=EXPERTS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for recipe, target in ((UPPER_RECIPE, UPPER_OUTPUT), (PATH_RECIPE, str(tmp_path / "rebuilt"))):
        r = subprocess.run([exe, recipe, target], cwd=out, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    want, got = _read_all(out), _read_all(str(tmp_path / "rebuilt"))
    assert sorted(got) == sorted(want)
    assert max(float(np.max(np.abs(want[k] - got[k]))) for k in want) <= 1e-5
