"""hm3jax.config: every configs/*.yaml parses; each config error is caught before any work, names
the key (and file), and leaves nothing written."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from hm3jax.config import (
    CONFIG_FILE,
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    CheckpointSource,
    LowerConfig,
    ModelsConfig,
    RunConfig,
    RunConfigError,
    TaskFiles,
    TasksConfig,
    UpperConfig,
    ZooSource,
    load_run_config,
    parse_run_config,
    task_names,
    to_yaml,
    validate,
)
from hm3jax.confighelp import config_keys
from hm3jax.models import ModelConfig
from hm3jax.rundir import check_run_dir, prepare_run_dir

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PAPER = ("qwen2.5-1.5b.yaml", "llama2-7b.yaml", "llama2-13b.yaml")


def test_configs_dir_has_the_documented_files():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))}
    assert {"default.yaml", "smoke.yaml", *PAPER} <= names


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))),
                         ids=os.path.basename)
def test_every_config_parses(path, tmp_path):
    cfg = parse_run_config(["--config_path", path])
    assert isinstance(cfg, RunConfig)
    if os.path.basename(path) in PAPER:  # their paths are placeholders: parse only
        ck = cfg.models.checkpoints
        assert ck is not None and ck.base and len(ck.experts) == 3
        assert cfg.tasks.kind == "files" and set(cfg.tasks.files) == set(ck.experts)
        assert task_names(cfg) == tuple(ck.experts)
        return
    resolved = validate(dataclasses.replace(cfg, output_dir=str(tmp_path / "run")))
    assert resolved.models.zoo is not None
    assert task_names(resolved) == ("math", "code", "translation")
    assert not os.path.exists(tmp_path / "run")


def test_resolved_config_round_trips_and_overrides_apply(tmp_path):
    cfg = validate(parse_run_config(["--config_path", os.path.join(CONFIGS, "smoke.yaml"),
                                     "--upper.density", "0.5", "--preferences.extra", "[[1, 0, 0]]",
                                     "--output_dir", str(tmp_path / "run")]))
    assert cfg.upper.density == 0.5 and cfg.preferences.extra == ((1.0, 0.0, 0.0),)
    assert prepare_run_dir(cfg) is False
    assert load_run_config(tmp_path / "run" / CONFIG_FILE) == cfg
    assert prepare_run_dir(cfg) is True  # same config: resume
    # neither model source resolves to the default zoo
    assert validate(RunConfig(output_dir=str(tmp_path / "x"))).models.zoo == ZooSource()


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def _refused(tmp_path, cfg_or_args, *words):
    """The config is refused with a message holding `words`, and nothing is written."""
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RunConfigError) as e:
        if isinstance(cfg_or_args, list):
            validate(parse_run_config(cfg_or_args))
        else:
            prepare_run_dir(validate(cfg_or_args))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == before
    return str(e.value)


def test_unknown_keys_are_named(tmp_path):
    out = str(tmp_path / "run")
    path = _yaml(tmp_path, "preferences:\n  n: 3\n  bogus_key: 2\n")
    _refused(tmp_path, ["--config_path", path, "--output_dir", out], "bogus_key", "preferences", path)
    _refused(tmp_path, ["--output_dir", out, "--upper.not_a_key", "1"], "--upper.not_a_key")
    _refused(tmp_path, ["--output_dir", out, "--upper.method", "magic"], "upper.method", "magic")
    _refused(tmp_path, ["--output_dir", out, "--preferences.n", "many"], "preferences.n")
    with pytest.raises(RunConfigError, match="no such file"):
        parse_run_config(["--config_path", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("extra,words", [
    ("[[0.5, 0.6, 0.0]]", ("preferences.extra[0]", "off the simplex", "sum to 1.1")),
    ("[[1.5, -0.5, 0.0]]", ("preferences.extra[0]", "off the simplex", ">= 0")),
    ("[[0.5, 0.5]]", ("preferences.extra[0]", "2 weights for 3 tasks")),
])
def test_preferences_off_the_simplex(tmp_path, extra, words):
    _refused(tmp_path, ["--output_dir", str(tmp_path / "run"), "--preferences.extra", extra], *words)


def _checkpoint(root, name: str, **over) -> str:
    """A directory holding only a config.json (validation reads nothing else)."""
    d = root / name
    d.mkdir()
    kw = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    kw.update(over)
    ModelConfig(**kw).to_json_file(d / "config.json")
    return str(d)


@pytest.fixture
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {n: _checkpoint(root, n) for n in ("base", "math", "code", "translation")} | {
        "wide": _checkpoint(root, "wide", hidden_size=32, intermediate_size=64), "root": str(root)}


def _cfg(tmp_path, ckpts, experts=("math", "code", "translation"), **over) -> RunConfig:
    source = CheckpointSource(base=ckpts["base"], experts={e: ckpts[e] for e in experts})
    return RunConfig(output_dir=str(tmp_path / "run"), models=ModelsConfig(checkpoints=source), **over)


def test_checkpoints_of_different_widths(tmp_path, ckpts):
    assert validate(_cfg(tmp_path, ckpts)).models.checkpoints.base == ckpts["base"]
    bad = _cfg(tmp_path, ckpts, experts=("math", "code", "wide"))
    bad = dataclasses.replace(bad, models=ModelsConfig(checkpoints=CheckpointSource(
        base=ckpts["base"], experts={"math": ckpts["math"], "code": ckpts["code"],
                                     "translation": ckpts["wide"]})))
    _refused(tmp_path, bad, "models.checkpoints.experts.translation",
             os.path.join(ckpts["wide"], "config.json"), "hidden_size 32 vs 64")
    missing = dataclasses.replace(bad, models=ModelsConfig(checkpoints=CheckpointSource(
        base=str(tmp_path / "nope"), experts={"math": ckpts["math"]})))
    _refused(tmp_path, missing, "models.checkpoints.base", "nope")


def test_task_count_must_match_the_experts(tmp_path, ckpts):
    _refused(tmp_path, _cfg(tmp_path, ckpts, experts=("math", "code")),
             "embedded suite has 3 tasks", "models.checkpoints.experts are 2")
    files = {n: TaskFiles(search=ckpts["base"] + "/config.json", heldout=ckpts["base"] + "/config.json")
             for n in ("math", "code")}
    cfg = _cfg(tmp_path, ckpts, tasks=TasksConfig(kind="files", files=files))
    _refused(tmp_path, cfg, "tasks.files has 2 tasks", "models.checkpoints.experts are 3")
    files["translation"] = TaskFiles(search=str(tmp_path / "none.jsonl"), heldout="x", scorer="chrf")
    cfg = _cfg(tmp_path, ckpts, tasks=TasksConfig(kind="files", files=files))
    _refused(tmp_path, cfg, "tasks.files.translation.search", "no such file")
    files["translation"] = dataclasses.replace(files["math"], scorer="bleu")
    cfg = _cfg(tmp_path, ckpts, tasks=TasksConfig(kind="files", files=files))
    _refused(tmp_path, cfg, "tasks.files.translation.scorer", "bleu")
    # the zoo's experts are the embedded tasks: task files must name them too
    zoo = RunConfig(output_dir=str(tmp_path / "run"), tasks=TasksConfig(kind="files", files={"math": files["math"]}))
    _refused(tmp_path, zoo, "tasks.files has 1 tasks", "zoo's experts are 3")


def test_model_source_and_output_dir(tmp_path, ckpts):
    both = dataclasses.replace(_cfg(tmp_path, ckpts), models=ModelsConfig(
        zoo=ZooSource(), checkpoints=CheckpointSource(base=ckpts["base"])))
    _refused(tmp_path, both, "models.zoo", "models.checkpoints")
    _refused(tmp_path, RunConfig(output_dir=str(tmp_path), models=ModelsConfig(zoo=ZooSource(config="huge"))),
             "models.zoo.config", "huge")
    inside = dataclasses.replace(_cfg(tmp_path, ckpts), output_dir=os.path.join(ckpts["math"], "run"))
    _refused(tmp_path, inside, "output_dir", "lies inside the input")
    assert sorted(os.listdir(ckpts["math"])) == ["config.json"]


def test_run_dir_made_by_a_different_config(tmp_path, ckpts):
    cfg = validate(_cfg(tmp_path, ckpts))
    assert prepare_run_dir(cfg) is False
    (tmp_path / "run" / "front.json").write_text("{}")
    before = (tmp_path / "run" / CONFIG_FILE).read_text()
    other = dataclasses.replace(cfg, seed=7, upper=dataclasses.replace(cfg.upper, density=0.5))
    msg = _refused(tmp_path, other, os.path.join(str(tmp_path / "run"), CONFIG_FILE), "upper.density",
                   "seed", "different config")
    assert "0.7" in msg and "0.5" in msg
    assert (tmp_path / "run" / CONFIG_FILE).read_text() == before
    assert sorted(os.listdir(tmp_path / "run")) == [CONFIG_FILE, "front.json"]
    # other log settings resume the same run
    assert check_run_dir(dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False)))
    # a non-empty directory that is not a run directory
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    _refused(tmp_path, dataclasses.replace(cfg, output_dir=str(tmp_path / "junk")), "not an hm3jax run")


def test_help_documents_fields(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    for text in ("--upper.density", "--preferences.extra", "--front.cost_objective",
                 "one weight per task", "Lower level"):
        assert text in out
    assert "output_dir: " in to_yaml(RunConfig())


def test_preference_matrix(tmp_path):
    import numpy as np

    from hm3jax.config import preference_matrix

    cfg = validate(parse_run_config(["--output_dir", str(tmp_path / "r"), "--preferences.n", "4",
                                     "--preferences.extra", "[[1, 0, 0]]"]))
    p = preference_matrix(cfg)
    assert p.shape == (5, 3) and np.allclose(p.sum(axis=1), 1) and (p >= 0).all()
    np.testing.assert_array_equal(p[-1], [1, 0, 0])
    np.testing.assert_array_equal(p, preference_matrix(cfg))  # seeded
    grid = validate(parse_run_config(["--output_dir", str(tmp_path / "r"), "--preferences.n", "5",
                                      "--preferences.kind", "grid"]))
    assert preference_matrix(grid).shape == (6, 3)  # Das-Dennis with 2 divisions


def test_default_yaml_is_the_dataclass_defaults():
    # `python -m hm3jax.train` without arguments runs RunConfig(): keep configs/default.yaml equal
    assert validate(parse_run_config(["--config_path", os.path.join(CONFIGS, "default.yaml")])) == \
        validate(RunConfig())


def test_a_lower_or_upper_section_changes_only_the_keys_it_gives(tmp_path):
    """One set of defaults: the sections' field defaults are the default run's (LowerConfig() ==
    DEFAULT_LOWER, UpperConfig() == DEFAULT_UPPER), so a config whose `lower:` section sets one key
    (draccus fills a section given from its class's field defaults) keeps every other setting of the
    default run: edit actions, the conditioned agent, POMO, rescore_top 8, ..."""
    assert LowerConfig() == DEFAULT_LOWER == RunConfig().lower
    assert UpperConfig() == DEFAULT_UPPER == RunConfig().upper
    got = parse_run_config(["--config_path", _yaml(tmp_path, "lower:\n  ppo:\n    iterations: 48\n")]).lower
    assert got == dataclasses.replace(DEFAULT_LOWER, ppo=dataclasses.replace(DEFAULT_LOWER.ppo, iterations=48))
    # a key of another subsection, of the upper level, and a command-line override without a file
    both = _yaml(tmp_path, "upper:\n  density: 0.5\nlower:\n  env:\n    rescore_top: 4\n")
    cfg = parse_run_config(["--config_path", both, "--lower.agent.identity_prob", "0.6"])
    assert cfg.upper == dataclasses.replace(DEFAULT_UPPER, density=0.5)
    assert cfg.lower == dataclasses.replace(DEFAULT_LOWER, env=dataclasses.replace(DEFAULT_LOWER.env, rescore_top=4),
                                            agent=dataclasses.replace(DEFAULT_LOWER.agent, identity_prob=0.6))
    cfg = parse_run_config(["--lower.ppo.iterations", "48", "--upper.density", "0.5"])
    assert cfg.lower == got and cfg.upper == dataclasses.replace(DEFAULT_UPPER, density=0.5)


def test_unusable_zoo_dir_is_an_error_before_the_run_dir_exists(tmp_path, capsys, monkeypatch):
    """A zoo directory of another config (e.g. left by an older version), or one the tool did not
    write: exit 2 naming models.zoo.dir and the rebuild command; no run directory, the zoo untouched."""
    import json

    from hm3jax import train

    stale = tmp_path / "zoo"
    stale.mkdir()
    manifest = {"format": 2, "config": {"hidden_size": 64}, "seed": 0, "models": {"base": "base"}}
    (stale / "zoo.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    argv = ["--models.zoo.dir", str(stale), "--output_dir", str(run), "--log.progress", "false"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "models.zoo.dir" in err and "another config" in err
    assert f"python -m hm3jax.zoo {stale} --config default --seed 0 --force" in err
    assert not run.exists() and sorted(os.listdir(stale)) == ["zoo.json"]
    # a user's directory that holds no zoo: refused, its file kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert train.main(["--models.zoo.dir", str(mine), "--output_dir", str(run)]) == 2
    assert "no zoo.json" in capsys.readouterr().err and not run.exists()
    assert (mine / "notes.txt").read_text() == "keep"

    # A config error found after the run directory was made (here: raised by the run itself) removes
    # what the new run wrote: the directory it created, or its config.yaml in a directory that existed.
    def fails(cfg, stop_after=None):
        raise RunConfigError("tasks.files.math.search: broken")

    monkeypatch.setattr(train, "run", fails)
    empty_zoo = ["--models.zoo.dir", str(tmp_path / "nozoo"), "--log.progress", "false"]
    assert train.main(empty_zoo + ["--output_dir", str(run)]) == 2
    assert "tasks.files.math.search: broken" in capsys.readouterr().err and not run.exists()
    (tmp_path / "existing").mkdir()
    assert train.main(empty_zoo + ["--output_dir", str(tmp_path / "existing")]) == 2
    assert os.listdir(tmp_path / "existing") == []


def test_help_documents_upper_and_lower_keys_with_run_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    assert "--upper.density float Kept fraction of each task vector" in out
    assert "--lower.ppo.lr float Adam learning rate of the encoder and actor. (default: 0.003)" in out
    assert "--upper.method str One of task_arithmetic" in out and "(default: auto)" in out
    assert "Config file for" not in out and "-v/--verbose" in out


def test_a_typo_is_one_line_exit_2_before_jax():
    import subprocess
    import sys

    code = ("import sys\nfrom hm3jax.train import main\nrc = main(['--upper.methd', 'x'])\n"
            "print('jax' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.stdout.split() == ["False", "2"], r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --upper.methd x (--upper.methd: did you mean --upper.method?)"]
    with pytest.raises(RunConfigError, match=r"^upper.density must be in \(0, 1\], got 2.0$"):
        parse_run_config(["--upper.density", "2"])


def _run_default(key: str):
    """The default of a dotted key in a run (RunConfig()); inside an optional section that a run
    leaves None (models.zoo, models.checkpoints), the section class's own default."""
    import typing

    value, cls = RunConfig(), RunConfig
    for part in key.split("."):
        if value is None:  # an optional section: its class's defaults are what --help shows
            value = cls()
        hint = typing.get_type_hints(type(value))[part]
        cls = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        value = getattr(value, part)
    return value


def test_help_gives_every_key_a_description_and_its_default(monkeypatch):
    """Each dotted key of RunConfig has a doc string under its field: --help shows "--key TYPE
    <description> (default: <the run's default>)". Fails on a field without a doc string."""
    from hm3jax.config import help_text, run_config_parser

    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping (argparse breaks lines after a hyphen)
    text = " ".join(help_text().split())
    actions = {o[2:]: a for a in run_config_parser().parser._actions for o in a.option_strings}
    keys = config_keys(RunConfig)
    assert len(keys) > 80 and "lower.ppo.lr" in keys and "models.zoo.dir" in keys
    missing = []
    for key in keys:
        action = actions.get(key)
        doc = " ".join((action.help or "").split()) if action is not None else ""
        default = _run_default(key)
        # the key's own entry (after the usage lines): "--key TYPE doc (default: value)"
        at = text.find(f" --{key} ", text.index("options:"))
        entry = text[at:at + len(key) + 60 + len(doc) + len(str(default)) + 12] if at >= 0 else ""
        if not doc or doc.startswith("(default") or f" {doc} (default: {default})" not in entry:
            missing.append(key)
    assert not missing, f"keys without a description or default in --help: {missing}"


def test_config_package_reexports_its_modules_names_without_jax():
    """hm3jax.config is a package of one-job modules (schema, parsing, files, validation); the names
    other modules import stay importable from hm3jax.config itself, which loads no JAX."""
    import subprocess
    import sys

    import hm3jax.config as config
    from hm3jax.config import parsing, schema, validation

    assert all(hasattr(config, name) for name in config.__all__)
    assert config.validate is validation.validate and config.RunConfig is schema.RunConfig
    assert config.parse_run_config is parsing.parse_run_config and callable(config.validate)
    code = "import sys, hm3jax.config; print('jax' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
