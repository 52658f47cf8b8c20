"""python -m hm3jax.recommend: the Tchebycheff pick on a hand-made front, preference errors, and
--export rebuilding the upper-level merge from the run's config."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.config import CheckpointSource, ModelsConfig, RunConfig, validate
from hm3jax.io import load_pretrained, save_pretrained
from hm3jax.models import ModelConfig, build_pool, forward, forward_path, init_params, shell_of
from hm3jax.recommend import RecommendError, main, parse_preference, pick_solution
from hm3jax.report import build_front, write_front
from hm3jax.rundir import prepare_run_dir
from hm3jax.search.upper import merge_for_preference

TASKS = ["math", "code", "translation"]


def sol(scores, path=(("math", 0),), shell="math", pref=(1 / 3, 1 / 3, 1 / 3)):
    return {"preference": list(pref), "upper": {"method": "task_arithmetic", "density": 1.0, "scale": 1.0,
                                                "seed": 0},
            "path": [list(s) for s in path], "shell": shell,
            "scores": {"search": list(scores), "heldout": list(scores)},
            "cost": {"layers": len(path), "parameters": 1, "flops_per_token": 1.0}, "dominated": False}


FRONT = {"tasks": TASKS, "ideal": [1.0, 1.0, 1.0], "solutions": [
    sol([0.9, 0.2, 0.2]), sol([0.2, 0.9, 0.2]), sol([0.2, 0.2, 0.9]), sol([0.6, 0.6, 0.6]), sol([0.5, 0.5, 0.5])]}


@pytest.mark.parametrize("pref,want", [
    ([1.0, 0.0, 0.0], 0),          # only math counts: 0.1 away
    ([0.0, 1.0, 0.0], 1),
    ([0.0, 0.0, 1.0], 2),
    ([1 / 3, 1 / 3, 1 / 3], 3),    # max gap 0.4/3 beats 0.8/3 of the specialists
    ([0.8, 0.1, 0.1], 0),          # 0.8*0.1 = 0.08 vs 0.8*0.4 = 0.32 for the balanced one
])
def test_pick_minimises_tchebycheff(pref, want):
    i, s, value = pick_solution(FRONT, parse_preference(pref, TASKS))
    assert i == want and s is FRONT["solutions"][want]
    scores = np.asarray([x["scores"]["heldout"] for x in FRONT["solutions"]])
    values = np.max(np.asarray(pref) * np.abs(scores - 1.0), axis=1)
    assert value == pytest.approx(values.min())


def test_preference_parsing():
    np.testing.assert_allclose(parse_preference("2,1,1", TASKS), [0.5, 0.25, 0.25])  # normalised
    np.testing.assert_allclose(parse_preference("0.2,0.3,0.5", TASKS), [0.2, 0.3, 0.5])
    for bad, words in [("0.5,0.5", "2 weights but the run has 3 tasks"), ("1,-1,1", ">= 0"),
                       ("0,0,0", "all zero"), ("a,b,c", "comma-separated numbers"), ("1,nan,0", "finite")]:
        with pytest.raises(RecommendError, match=words):
            parse_preference(bad, TASKS)


def test_cli_prints_the_pick_and_refuses_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    write_front(run, build_front(TASKS, FRONT["solutions"], {}, {}, ideal=[1.0, 1.0, 1.0]))
    assert main([str(run), "--preference", "0,1,0"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["scores"]["heldout"] == [0.2, 0.9, 0.2]
    assert "solution 1 of 5" in out.err
    assert main([str(run), "--preference", "1,1"]) == 2
    assert "2 weights but the run has 3 tasks (math, code, translation)" in capsys.readouterr().err
    assert main([str(run), "--preference", "1,0,0", "--search-iterations", "5"]) == 2
    err = capsys.readouterr().err
    assert "--search-iterations:" in err and "config.yaml" in err, err
    # A run whose lower level trained one agent per preference cannot answer a new one online.
    import dataclasses

    from hm3jax.config import RunConfig, to_yaml

    per_pref = RunConfig(output_dir=str(run))
    per_pref = dataclasses.replace(per_pref, lower=dataclasses.replace(
        per_pref.lower, ppo=dataclasses.replace(per_pref.lower.ppo, mode="per_preference")))
    (run / "config.yaml").write_text(to_yaml(per_pref))
    (run / "checkpoints" / "lower").mkdir(parents=True)
    assert main([str(run), "--preference", "1,0,0", "--search-iterations", "5"]) == 2
    assert "lower.ppo.mode is 'per_preference'" in capsys.readouterr().err
    assert main([str(run), "--preference", "1,0,0", "--search-iterations", "-1"]) == 2
    assert "--search-iterations must be >= 0" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--preference", "1,0,0"]) == 2
    assert "front.json: no such file" in capsys.readouterr().err


def test_recommend_compares_the_pick_with_experts_base_and_baselines(tmp_path, capsys):
    run = tmp_path / "run"
    refs = {"base": sol([0.1, 0.1, 0.1]), "math": sol([0.95, 0.1, 0.1]), "code": sol([0.1, 0.95, 0.1]),
            "translation": sol([0.1, 0.1, 0.95])}
    baselines = {"ties": [sol([0.3, 0.3, 0.3]), sol([0.7, 0.1, 0.1])], "random_path": [sol([0.4, 0.4, 0.4])]}
    write_front(run, build_front(TASKS, FRONT["solutions"], baselines, refs, ideal=[1.0, 1.0, 1.0]))
    assert main([str(run), "--preference", "1,0,0"]) == 0
    err = capsys.readouterr().err
    for row in ["pick (solution 0)", "base", "expert math", "expert code", "expert translation",
                "TIES (best of 2)", "Random path search (best of 1)"]:
        assert any(line.startswith(row) for line in err.splitlines()), (row, err)
    # under λ = (1, 0, 0) the math expert (0.95) beats the pick (0.9); TIES' best is its (0.7, ...) one
    ties = next(line for line in err.splitlines() if line.startswith("TIES"))
    assert ties.split()[-1] == "0.3000" and "0.7000" in ties
    assert "beating the pick (0.1000): expert math (0.0500)" in err


def test_recommend_json_is_rounded(tmp_path, capsys):
    run = tmp_path / "run"
    s = sol([float(np.float32(0.7)), 0.2, 0.2])
    write_front(run, build_front(TASKS, [s], {}, {}, ideal=[1.0, 1.0, 1.0]))
    assert main([str(run), "--preference", "1,0,0"]) == 0
    out = capsys.readouterr().out
    assert "0.699999988" not in out and json.loads(out)["scores"]["heldout"][0] == 0.7


CFG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def test_export_rebuilds_the_merge_from_the_run_config(tmp_path, capsys):
    base = init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    experts = [jax.tree.map(lambda a: np.asarray(a) + 0.01 * rng.standard_normal(a.shape, np.float32), base)
               for _ in range(3)]
    ckpt = {n: save_pretrained(tmp_path / "models" / n, CFG, p) for n, p in zip(["base", *TASKS], [base, *experts])}
    run = tmp_path / "run"
    cfg = validate(RunConfig(output_dir=str(run), models=ModelsConfig(checkpoints=CheckpointSource(
        base=ckpt["base"], experts={t: ckpt[t] for t in TASKS}))))
    prepare_run_dir(cfg)
    pref = [0.2, 0.5, 0.3]
    path = [("merge", 0), ("code", 2), ("merge", 2)]
    chosen = {**sol([0.7, 0.7, 0.7], path, "merge", pref),
              "upper": {"method": "task_arithmetic", "density": 1.0, "scale": 0.8, "seed": 5}}
    write_front(run, build_front(TASKS, [sol([0.1, 0.1, 0.1]), chosen], {}, {}, ideal=[1.0, 1.0, 1.0]))
    out = tmp_path / "export"
    assert main([str(run), "--preference", "1,1,1", "--export", str(out)]) == 0
    merge = jax.jit(merge_for_preference, static_argnums=0)(
        "task_arithmetic", base, experts, jnp.asarray(pref), jax.random.key(5), 1.0, 0.8)
    models = {"merge": merge, "code": experts[1]}
    pool = build_pool(list(models.values()), list(models))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
    want = forward_path(CFG, shell_of(merge), pool, pool.path(path), tokens)
    cfg2, params2 = load_pretrained(out)
    assert cfg2.num_hidden_layers == 3
    np.testing.assert_allclose(np.asarray(forward(cfg2, params2, tokens)), np.asarray(want), atol=1e-5)
    record = json.load(open(out / "hm3jax_solution.json"))
    assert record["upper"]["seed"] == 5 and record["path"] == [list(s) for s in path]
    assert os.path.isfile(out / "mergekit_upper.yml") and os.path.isfile(out / "mergekit_path.yml")
    capsys.readouterr()
    # the export directory now exists: refused without --overwrite, and never inside the inputs
    assert main([str(run), "--preference", "1,1,1", "--export", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(run), "--preference", "1,1,1", "--export", str(run / "x")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert not os.path.exists(run / "x")


def test_merge_key_from_seed_or_key_data():
    from hm3jax.recommend import merge_key
    from hm3jax.run.record import Solution, UpperSettings

    k_merge = jax.random.split(jax.random.key(3))[0]  # what run_upper merges with for key(3)
    rec = Solution([1, 0, 0], UpperSettings("dare_ties", 0.5, 1.0, 3, key_data=jax.random.key_data(k_merge)),
                   [("merge", 0)], "merge", [0, 0, 0], [0, 0, 0]).to_json()
    assert json.loads(json.dumps(rec)) == rec
    same = lambda a, b: np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert same(merge_key(rec["upper"]), k_merge)
    assert same(merge_key({"seed": 3}), jax.random.key(3))
    with pytest.raises(RecommendError, match="neither 'seed' nor 'key_data'"):
        merge_key({"method": "ties"})


def test_module_entry_point(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    write_front(run, build_front(TASKS, FRONT["solutions"], {}, {}, ideal=[1.0, 1.0, 1.0]))
    r = subprocess.run([sys.executable, "-m", "hm3jax.recommend", str(run), "--preference", "0,0,1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scores"]["heldout"] == [0.2, 0.2, 0.9]


@pytest.mark.parametrize("content, words", [
    (None, "holds no zoo"),
    ('{"format": 2, "config": {"hidden_size": 8}, "seed": 0, "models": {"base": "base"}}', "another config"),
    ("{not json", "not a readable JSON manifest"),
])
def test_export_refuses_a_zoo_that_is_not_the_runs(tmp_path, content, words):
    """--export rebuilds the merge from the run's zoo: a missing, rebuilt (other config) or corrupt zoo
    is a RecommendError naming models.zoo.dir, never a traceback or another zoo's weights."""
    from hm3jax.config import ZooSource, to_yaml
    from hm3jax.recommend import source_checkpoints

    zoo = tmp_path / "zoo"
    if content is not None:
        zoo.mkdir()
        (zoo / "zoo.json").write_text(content)
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(output_dir=str(run), models=ModelsConfig(zoo=ZooSource(dir=str(zoo))))
    (run / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(RecommendError, match="models.zoo.dir") as e:
        source_checkpoints(run)
    assert words in str(e.value)
