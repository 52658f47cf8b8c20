"""The merge CLI and out-of-core runner: errors that name what is wrong and leave nothing behind,
atomic output, and agreement between the pytree API and the on-disk merge (same PRNG streams)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import yaml
from merging_zoo import build_zoo, load_params, read_all

import hm3jax.merging.stream  # noqa: F401  (merging.stream used below)
from hm3jax import merging
from hm3jax.merging.__main__ import main
from hm3jax.models.params import hf_name, iter_leaves


@pytest.fixture(scope="session")
def zoo():
    return build_zoo()


def _ties(z, **over):
    r = {"merge_method": "ties", "base_model": z["base"], "dtype": "float32",
         "models": [{"model": z["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": z["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    r.update(over)
    return r


def _run(tmp_path, recipe, *extra):
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
    return main([str(cfg), str(tmp_path / "out"), "--quiet", *extra])


def _left_behind(tmp_path):
    return sorted(p for p in os.listdir(tmp_path) if p not in ("recipe.yml",))


@pytest.mark.parametrize("case,expect", [
    ("shape", r"tensor model\.embed_tokens\.weight: input shapes differ: .*wide \[128, 32\].*base \[128, 64\]"),
    ("vocab", r"tensor model\.embed_tokens\.weight: input shapes differ: .*\[160, 64\]"),
    ("no_base", r"merge method 'ties' needs a base model; set base_model"),
    ("density", r"tensor model\.embed_tokens\.weight: density 1\.5 is outside \(0, 1\]"),
    ("density0", r"density 0\.0 is outside \(0, 1\]"),
    ("method", r"unknown merge method 'tiez'; supported: arcee_fusion, breadcrumbs, .*ties"),
    ("missing_model", r"model '/nonexistent/m' is not a local directory"),
    ("slices", r"all sources of a slice must have the same number of layers"),
    ("weight", r"needs parameter 'weight' for tensor model\.embed_tokens\.weight"),
    ("duplicate", r"listed more than once as inputs: .*ft1"),
], ids=lambda v: v if " " not in v and "\\" not in v else "")
def test_bad_inputs_fail_clearly_and_leave_nothing(zoo, tmp_path, capsys, case, expect):
    z = zoo
    recipe = {
        "shape": _ties(z, models=[{"model": z["wide"], "parameters": {"weight": 1.0}}]),
        "vocab": _ties(z, models=[{"model": z["bigvocab"], "parameters": {"weight": 1.0}}]),
        "no_base": _ties(z, base_model=None),
        "density": _ties(z, parameters={"density": 1.5},
                         models=[{"model": z["ft1"], "parameters": {"weight": 1.0}}]),
        "density0": _ties(z, models=[{"model": z["ft1"], "parameters": {"weight": 1.0, "density": 0.0}}]),
        "method": _ties(z, merge_method="tiez"),
        "missing_model": _ties(z, models=[{"model": "/nonexistent/m", "parameters": {"weight": 1.0}}]),
        "slices": {"merge_method": "passthrough", "slices": [{"sources": [
            {"model": z["ft1"], "layer_range": [0, 2]}, {"model": z["ft2"], "layer_range": [0, 3]}]}]},
        "weight": _ties(z, models=[{"model": z["ft1"]}]),
        "duplicate": _ties(z, models=[{"model": z["ft1"], "parameters": {"weight": 1.0}}] * 2),
    }[case]
    if case == "no_base":
        recipe.pop("base_model")
    assert _run(tmp_path, recipe) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(expect, err), err
    assert _left_behind(tmp_path) == []


@pytest.mark.slow
def test_existing_output_and_overwrite(zoo, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert _run(tmp_path, _ties(zoo)) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert _run(tmp_path, _ties(zoo), "--overwrite") == 0
    assert "keep.txt" not in os.listdir(tmp_path / "out")
    assert _left_behind(tmp_path) == ["out"]


def test_failure_while_writing_removes_partial_output(zoo, tmp_path, monkeypatch):
    from hm3jax.io import safetensors_writer

    real = safetensors_writer.ShardedWriter.write
    calls = []

    def flaky(self, name, array):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(self, name, array)

    monkeypatch.setattr(safetensors_writer.ShardedWriter, "write", flaky)
    with pytest.raises(OSError, match="simulated"):
        merging.stream.merge_recipe(_ties(zoo), tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_pytree_api_equals_cli_for_random_method(zoo, tmp_path):
    """dare_ties through `merging.dare_ties` on loaded pytrees == the CLI with the same seed."""
    recipe = {"merge_method": "dare_ties", "base_model": zoo["base"], "dtype": "float32",
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 0.7, "density": 0.4}},
                         {"model": zoo["ft2"], "parameters": {"weight": 0.4, "density": 0.6}}]}
    assert _run(tmp_path, recipe, "--random-seed", "7") == 0
    got = read_all(str(tmp_path / "out"))
    # Two leaves (one plain, one layer-stacked) keep compilation short; keys depend only on HF names.
    def subset(t):
        return {"embed_tokens": t["embed_tokens"], "layers": {"mlp": {"up_proj": t["layers"]["mlp"]["up_proj"]}}}

    base, ft1, ft2 = (subset(load_params(zoo[k])) for k in ("base", "ft1", "ft2"))
    merged = merging.dare_ties(base, [ft1, ft2], np.array([0.7, 0.4]), key=jax.random.PRNGKey(7),
                               density=np.array([0.4, 0.6]))
    for path, leaf in iter_leaves(merged):
        if path[0] == "layers":
            for i in range(leaf.shape[0]):
                np.testing.assert_allclose(got[hf_name(path, i)], leaf[i], atol=1e-6)
        else:
            np.testing.assert_allclose(got[hf_name(path)], leaf, atol=1e-6)


def test_gradient_parameters_do_not_recompile(zoo, tmp_path, monkeypatch):
    """mergekit gradients (a parameter given as a list over depth) are jit arguments, not constants:
    one trace per tensor shape, whatever the per-layer values."""
    from hm3jax.merging import METHODS, stream

    shapes_traced = []
    ties = METHODS["ties"]

    def counting(base, models, weights, key, **params):
        shapes_traced.append(tuple(models[0].shape))  # runs once per trace, not per call
        return ties.merge_tensor(base, models, weights, key, **params)

    monkeypatch.setitem(METHODS, "ties", ties._replace(merge_tensor=counting))
    recipe = _ties(zoo, parameters={"density": [0.2, 0.9], "weight": [1.0, 0.1]},
                   models=[{"model": zoo["ft1"]}, {"model": zoo["ft2"], "parameters": {"density": [0.9, 0.5, 0.3]}}])
    stream.merge_recipe(recipe, tmp_path / "out", progress=False)
    out = read_all(str(tmp_path / "out"))
    assert len(shapes_traced) == len({tuple(a.shape) for a in out.values()})
    assert sorted(set(shapes_traced)) == sorted(shapes_traced)


def test_inputs_are_read_not_mapped_and_read_ahead_limits_keep_the_output(zoo, tmp_path, monkeypatch):
    """The runner copies inputs out of the files (no memory map stays resident) and the read-ahead
    limits change only the schedule, never the merged tensors."""
    from hm3jax.io import safetensors_io

    def no_map(self, name):
        raise AssertionError(f"merge mapped {name} with CheckpointReader.get")

    monkeypatch.setattr(safetensors_io.CheckpointReader, "get", no_map)
    runs = {"default": (), "none": ("--prefetch", "0"), "one": ("--prefetch-bytes", "1"),
            "wide": ("--prefetch", "4", "--prefetch-bytes", "1GB")}
    for tag, extra in runs.items():
        (tmp_path / tag).mkdir()
        assert _run(tmp_path / tag, _ties(zoo), *extra) == 0
    monkeypatch.undo()
    outs = {tag: read_all(str(tmp_path / tag / "out")) for tag in runs}
    for tag, got in outs.items():
        assert got.keys() == outs["default"].keys()
        for name, arr in got.items():
            np.testing.assert_array_equal(arr, outs["default"][name], err_msg=f"{tag}: {name}")


def test_bad_prefetch_bytes(zoo, tmp_path, capsys):
    assert _run(tmp_path, _ties(zoo), "--prefetch-bytes", "lots") == 2
    assert "prefetch_bytes 'lots'" in capsys.readouterr().err
    assert _left_behind(tmp_path) == []


# A tutorial's mergekit-yaml command line, with many of mergekit 0.1.5's options.
TUTORIAL_FLAGS = ["--copy-tokenizer", "--out-shard-size", "100k", "--lazy-unpickle", "--allow-crimes", "--cuda",
                  "--low-cpu-memory", "--trust-remote-code", "--lora-merge-cache", "/tmp/lora-cache",
                  "--clone-tensors", "--write-model-card", "-v", "--random-seed", "7", "--safe-serialization",
                  "--multi-gpu", "--num-threads", "2", "--no-async-write", "-j", "2"]
NO_EFFECT = ["--lazy-unpickle", "--allow-crimes", "--cuda", "--low-cpu-memory", "--trust-remote-code",
             "--lora-merge-cache /tmp/lora-cache", "--clone-tensors", "--multi-gpu", "--num-threads 2",
             "--no-async-write"]


def _front_matter(text):
    assert text.startswith("---\n"), text[:80]
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_mergekit_yaml_command_line_runs_and_writes_card_and_transformers_version(zoo, tmp_path, capsys):
    import json
    from importlib import metadata

    recipe = {"merge_method": "dare_ties", "base_model": zoo["base"], "dtype": "float32",
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": zoo["ft2"], "parameters": {"weight": 0.4, "density": 0.5}}]}
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "merged"
    assert main([str(cfg), str(out), *TUTORIAL_FLAGS]) == 0
    err = capsys.readouterr().err
    for flag in NO_EFFECT:  # one note per option without effect, naming it
        assert sum(line.startswith(f"note: {flag} (a mergekit-yaml option) has no effect here: ")
                   for line in err.splitlines()) == 1, (flag, err)
    assert "--safe-serialization" not in err and "--copy-tokenizer" not in err  # what hm3jax does anyway
    assert "note: merge method 'dare_ties' draws random masks; hm3jax's masks (seed 7) are not mergekit's" in err
    merged = read_all(str(out))
    timed = [line for line in err.splitlines() if line.startswith("tensor ") and " merge " in line]
    assert len(timed) == len(merged)  # -v: one timing line per tensor
    assert any(line.startswith("tensor model.layers.0.mlp.up_proj.weight [128x64 float32]: load ") for line in timed)
    assert "tokenizer.json" in os.listdir(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())  # --out-shard-size 100k: shards
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_version"] == metadata.version("transformers")
    meta, body = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["merge", "mergekit-compatible"]
    assert "base_model" not in meta  # local inputs are not Hub ids; the body names them
    assert f"with `{zoo['base']}` as the base" in body and "dare_ties" in body
    assert f"* `{zoo['ft1']}`" in body and f"* `{zoo['ft2']}`" in body
    assert cfg.read_text().strip() in body  # the recipe, verbatim
    # the same seed through the in-memory API: --random-seed acted
    ft1 = load_params(zoo["ft1"])
    name = "model.embed_tokens.weight"
    want = merging.dare_ties({"embed_tokens": load_params(zoo["base"])["embed_tokens"]},
                             [{"embed_tokens": load_params(zoo[k])["embed_tokens"]} for k in ("ft1", "ft2")],
                             np.array([0.6, 0.4]), key=jax.random.PRNGKey(7), density=0.5)
    np.testing.assert_allclose(merged[name], want["embed_tokens"]["weight"], atol=1e-6)
    assert not np.allclose(merged[name], ft1["embed_tokens"]["weight"])


def test_no_write_model_card_and_hub_ids_in_the_card(zoo, tmp_path):
    assert _run(tmp_path, _ties(zoo), "--no-write-model-card", "--no-copy-tokenizer") == 0
    files = os.listdir(tmp_path / "out")
    assert "README.md" not in files and "tokenizer.json" not in files
    card = merging.model_card("ties", ["org/ft-a", "/data/hub/models--org--ft-b/snapshots/abc123"],
                              base_model="org/base", recipe_yaml="merge_method: ties\n", name="my-merge")
    meta, body = _front_matter(card)
    assert meta == {"base_model": ["org/base", "org/ft-a", "org/ft-b"], "library_name": "transformers",
                    "tags": ["merge", "mergekit-compatible"]}
    assert body.lstrip().startswith("# my-merge") and "```yaml\nmerge_method: ties\n```" in body


def test_unknown_option_is_still_refused(zoo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, _ties(zoo), "--no-such-option")
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
