"""Issue 24: what commands read back (front.json, zoo.json, config.yaml, checkpoints, task files,
recipes) is untrusted input; nothing non-finite is written; one process per run directory.

Each case asserts the one-line error (exit 2) and that nothing was lost or left half-written: the
whole test directory is hashed before and after. Runs in-process on tiny checkpoint models (no
zoo, no training), except the one resume test marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
import yaml
from reliability_helpers import TASKS, one_line_error, solution, tree_hashes, write_front
from reliability_helpers import FifoWatchdog as _FifoWatchdog

from hm3jax.config import ModelsConfig, RunConfig, ZooSource, to_yaml, validate
from hm3jax.recommend import main as recommend

# ------------------------------------------------------------------ 2. front.json is untrusted
BAD_SOLUTIONS = {
    "nan_heldout": (lambda s: s["scores"].__setitem__("heldout", [float("nan"), 0.5, 0.5]),
                    r"solutions\[0\]\.scores\.heldout\[0\]: expected a finite number, got nan"),
    "inf_scale": (lambda s: s["upper"].__setitem__("scale", float("inf")), r"solutions\[0\]\.upper\.scale"),
    "nan_density": (lambda s: s["upper"].__setitem__("density", float("nan")), r"upper\.density.*\(0\.0, 1\.0\]"),
    "zero_density": (lambda s: s["upper"].__setitem__("density", 0), r"upper\.density"),
    "no_path": (lambda s: s.pop("path"), r"solutions\[0\]: no 'path'"),
    "non_pair_step": (lambda s: s["path"].__setitem__(1, ["code", 2, 9]), r"path\[1\]: expected a \[model name, layer"),
    "step_string": (lambda s: s["path"].__setitem__(0, "merge"), r"path\[0\]: expected a \[model name"),
    "shell_number": (lambda s: s.__setitem__("shell", 7), r"solutions\[0\]\.shell: expected a non-empty string"),
    "key_data_shape": (lambda s: s["upper"].__setitem__("key_data", [[0, 5]]), r"upper\.key_data: expected a list of 2"),
    "huge_seed": (lambda s: (s["upper"].pop("key_data"), s["upper"].__setitem__("seed", 2**70)),
                  r"upper\.seed: expected an integer in \[0, 4294967296\)"),
    "negative_weight": (lambda s: s.__setitem__("preference", [-1, 1, 1]), r"preference\[0\]"),
    "no_scores": (lambda s: s.pop("scores"), r"solutions\[0\]\.scores: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOLUTIONS))
def test_recommend_refuses_a_bad_solution_record(run_copy, tmp_path, capsys, case):
    mutate, words = BAD_SOLUTIONS[case]
    rec = solution()
    mutate(rec)
    write_front(run_copy, [rec])
    before = tree_hashes(tmp_path)
    assert recommend([str(run_copy), "--preference", "1,1,1", "--export", str(tmp_path / "out")]) == 2
    one_line_error(capsys, r"front\.json: ", words)
    assert tree_hashes(tmp_path) == before  # no export, nothing half-written


@pytest.mark.parametrize("ideal,words", [([float("nan")] * 3, r"ideal\[0\]"), ([1.0, 1.0], r"ideal: 2 values for 3"),
                                         ("high", r"ideal: expected a list")])
def test_recommend_refuses_a_bad_ideal_point(run_copy, capsys, ideal, words):
    write_front(run_copy, [solution(), solution(scores=(0.1, 0.1, 0.1))], ideal=ideal)
    assert recommend([str(run_copy), "--preference", "1,1,1"]) == 2
    one_line_error(capsys, words)


@pytest.mark.parametrize("content,words", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"tasks": "math", "ideal": [], "solutions": []}', "tasks: expected a non-empty list"),
    ("[1, 2]", "expected a JSON object"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_recommend_refuses_a_malformed_front_document(run_copy, capsys, content, words):
    path = run_copy / "front.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert recommend([str(run_copy), "--preference", "1,1,1"]) == 2
    one_line_error(capsys, words)


def test_recommend_refuses_an_infinite_upper_scale_in_the_runs_config(run_copy, tmp_path, capsys):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["upper"]["scale"] = float("inf")
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = tree_hashes(tmp_path)
    assert recommend([str(run_copy), "--preference", "1,1,1", "--export", str(tmp_path / "out")]) == 2
    one_line_error(capsys, r"config\.yaml", r"upper\.scale is inf")
    assert tree_hashes(tmp_path) == before


def test_a_merge_that_overflows_is_never_exported(run_copy, tmp_path, capsys):
    """A scale finite in the record (1e39) but not in float32 makes the merge Inf: the export refuses
    the tensor by name."""
    write_front(run_copy, [solution(scale=1e39)])
    before = tree_hashes(tmp_path)
    assert recommend([str(run_copy), "--preference", "1,1,1", "--export", str(tmp_path / "out")]) == 2
    one_line_error(capsys, r"tensor .* holds \d+ NaN/Inf value")
    assert tree_hashes(tmp_path) == before


def _fake_zoo(root, models: dict):
    """A directory that check_zoo_dir takes for the SMALL zoo (seed 0), listing `models`."""
    from hm3jax.zoo import SMALL

    zoo = root / "zoo"
    zoo.mkdir()
    for sub in models.values():
        d = sub if os.path.isabs(sub) else zoo / sub
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{}")
    (zoo / "zoo.json").write_text(json.dumps({"format": 2, "config": SMALL.to_dict(), "seed": 0, "models": models}))
    return zoo


@pytest.mark.parametrize("where,words", [("dotdot", "not a plain relative path"), ("absolute", "not a plain relative path"),
                                         ("symlink", "outside the model directory")])
def test_recommend_refuses_zoo_models_outside_the_zoo(tmp_path, capsys, where, words):
    outside = tmp_path / "elsewhere" / "code"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    sub = {"dotdot": "../elsewhere/code", "absolute": str(outside), "symlink": "code_link"}[where]
    zoo = _fake_zoo(tmp_path, {"base": "base", "math": "math", "translation": "translation",
                               **({"code": sub} if where != "symlink" else {"code": "code_link"})})
    if where == "symlink":
        import shutil

        shutil.rmtree(zoo / "code_link")
        os.symlink(outside, zoo / "code_link")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(RunConfig(output_dir=str(run), models=ModelsConfig(
        zoo=ZooSource(dir=str(zoo), config="small")))))
    write_front(run, [solution(path=(("code", 0),), shell="code")])
    before = tree_hashes(tmp_path)
    assert recommend([str(run), "--preference", "1,1,1", "--export", str(tmp_path / "out")]) == 2
    one_line_error(capsys, r"zoo\.json: models\.code", words)
    assert tree_hashes(tmp_path) == before


def test_search_iterations_never_builds_a_zoo_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """A run with a relative zoo dir, asked from another directory: refused, nothing created here."""
    run = tmp_path / "run"
    (run / "checkpoints" / "lower").mkdir(parents=True)
    cfg = RunConfig(output_dir=str(run), models=ModelsConfig(zoo=ZooSource(dir="zoo/small", config="small")))
    text = to_yaml(cfg).replace("mode: per_preference", "mode: conditioned")
    (run / "config.yaml").write_text(text)
    write_front(run, [solution()])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = tree_hashes(tmp_path)
    assert recommend([str(run), "--preference", "1,1,1", "--search-iterations", "1"]) == 2
    one_line_error(capsys, "models.zoo.dir zoo/small holds no zoo")
    assert tree_hashes(tmp_path) == before and not os.listdir(elsewhere)


# ------------------------------------------------- 2. fuzz: mutated solution records vs recommend
ODD = [None, True, -1, 0, 1, 2, 7, 2**31, 2**70, -(2**63), 0.5, 1e38, -1e-30, float("nan"), float("inf"),
       float("-inf"), "", "merge", "code", "x" * 200, [], [0], [0, 1], [[0, 1]], ["code", 1], [0.1, 0.2, 0.7],
       {}, {"a": 1}]
FIELDS = [("preference",), ("preference", 0), ("upper",), ("upper", "method"), ("upper", "density"),
          ("upper", "scale"), ("upper", "seed"), ("upper", "key_data"), ("upper", "key_data", 1), ("path",),
          ("path", 0), ("path", 1, 0), ("path", 1, 1), ("path", 2), ("shell",), ("scores",),
          ("scores", "heldout"), ("scores", "heldout", 2), ("aligned",), ("cost",)]
FUZZ_ITERATIONS = 400


def _mutate(rec, rng):
    rec = copy.deepcopy(rec)
    for _ in range(int(rng.integers(1, 3))):
        field = FIELDS[int(rng.integers(len(FIELDS)))]
        target = rec
        try:
            for k in field[:-1]:
                target = target[k]
            if rng.integers(6) == 0 and isinstance(target, dict):
                target.pop(field[-1], None)
            else:
                target[field[-1]] = copy.deepcopy(ODD[int(rng.integers(len(ODD)))])
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed the container
    return rec


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{path}: {name} written")
    return json.loads(open(path).read(), parse_constant=no_constant)


def test_fuzz_solution_records_against_recommend(run_copy, tmp_path, capsys):
    """Mutated solution records: recommend either exits 2 with one line and writes nothing, or exports
    a model whose every tensor is finite and whose record is strict JSON; never a traceback."""
    from hm3jax.io import CheckpointReader

    rng = np.random.default_rng(24)
    outcomes = {0: 0, 2: 0}
    for i in range(FUZZ_ITERATIONS):
        rec = _mutate(solution(), rng)
        write_front(run_copy, [rec])
        out = tmp_path / f"out{i}"
        rc = recommend([str(run_copy), "--preference", "1,1,1", "--export", str(out)])
        err = capsys.readouterr().err
        assert rc in (0, 2), (i, rec, err)
        outcomes[rc] += 1
        if rc == 2:
            lines = err.splitlines()  # the pick's summary line may come first; one error line, last
            assert lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1 \
                and "Traceback" not in err, (i, rec, err)
            assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(f".out{i}.")]
            continue
        with CheckpointReader(out) as r:
            for name in r.names:
                assert np.isfinite(np.asarray(r.get(name), np.float32)).all(), (i, name, rec)
        _strict_json(out / "hm3jax_solution.json")
    print(f"fuzz outcomes: {outcomes}")
    assert outcomes[0] > 5 and outcomes[2] > FUZZ_ITERATIONS // 2


# -------------------------------------------------- 4. train: config values and output locations
@pytest.mark.parametrize("args,words", [
    (["--upper.scale", ".nan"], r"upper\.scale is nan; every numeric config value must be a finite number"),
    (["--upper.es_sigma", ".nan"], r"upper\.es_sigma is nan"),
    (["--lower.ppo.lr", ".inf"], r"lower\.ppo\.lr is inf"),
    (["--lower.ppo.critic_lr", "0"], r"lower\.ppo\.critic_lr must be > 0"),
    (["--seed", str(2**70)], r"seed must be an integer in \[0, 2\*\*32\)"),
    (["--models.zoo.seed", "-1"], r"models\.zoo\.seed must be an integer in \[0, 2\*\*32\)"),
    (["--preferences.n", str(10**12)], r"preferences\.n is 1000000000000"),
])
def test_train_refuses_nonfinite_or_out_of_range_values_before_any_work(tmp_path, monkeypatch, capsys, args, words):
    from hm3jax.train import main as train

    monkeypatch.chdir(tmp_path)
    before = tree_hashes(tmp_path)
    assert train(["--output_dir", str(tmp_path / "run"), "--models.zoo.dir", str(tmp_path / "zoo"), *args]) == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("where,words", [("below_file", r"output_dir .*: .*is not a directory \(a file is in the way\)"),
                                         ("read_only", r"output_dir .*: cannot create files in /proc")])
def test_train_refuses_an_unwritable_output_dir_before_any_work(tmp_path, monkeypatch, capsys, where, words):
    from hm3jax.train import main as train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    out = tmp_path / "notes.txt" / "run" if where == "below_file" else "/proc/1/hm3jax-run"
    before = tree_hashes(tmp_path)
    assert train(["--output_dir", str(out), "--models.zoo.dir", str(tmp_path / "zoo")]) == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


def test_train_refuses_an_unwritable_zoo_dir_before_training_it(tmp_path, monkeypatch, capsys):
    from hm3jax.train import main as train

    monkeypatch.chdir(tmp_path)
    before = tree_hashes(tmp_path)
    assert train(["--output_dir", str(tmp_path / "run"), "--models.zoo.dir", "/proc/1/zoo"]) == 2
    one_line_error(capsys, r"models\.zoo\.dir \(the zoo is built there\) /proc/1/zoo: cannot create files")
    assert tree_hashes(tmp_path) == before


def test_zoo_cli_refuses_an_unwritable_out_dir_before_training(tmp_path, capsys):
    from hm3jax.zoo.cli import main as zoo

    (tmp_path / "file").write_text("x")
    before = tree_hashes(tmp_path)
    assert zoo([str(tmp_path / "file" / "zoo"), "--config", "small"]) == 2
    one_line_error(capsys, r"OUT_DIR .*is not a directory")
    assert zoo(["/proc/1/zoo", "--config", "small"]) == 2
    one_line_error(capsys, r"OUT_DIR /proc/1/zoo: cannot create files")
    assert zoo([str(tmp_path / "z"), "--seed", str(2**70)]) == 2
    one_line_error(capsys, r"--seed must be in \[0, 2\*\*32\)")
    assert tree_hashes(tmp_path) == before


def test_run_directory_spelled_relatively_or_moved_is_the_same_run(tmp_path, monkeypatch):
    from hm3jax.rundir import check_run_dir, prepare_run_dir

    cfg = validate(RunConfig(output_dir=str(tmp_path / "a" / "run"), models=ModelsConfig(
        zoo=ZooSource(dir=str(tmp_path / "zoo")))))
    assert prepare_run_dir(cfg) is False
    monkeypatch.chdir(tmp_path / "a")
    assert check_run_dir(validate(RunConfig(output_dir="run", models=cfg.models)))
    assert check_run_dir(validate(RunConfig(output_dir="./run/", models=cfg.models)))
    os.rename(tmp_path / "a", tmp_path / "b")
    assert check_run_dir(validate(RunConfig(output_dir=str(tmp_path / "b" / "run"), models=cfg.models)))


# ------------------------------------------------------------------ 3. the run directory lock
def test_a_second_process_on_a_run_directory_gets_a_clear_error(tmp_path, monkeypatch, capsys):
    from hm3jax.rundir import LOCK_FILE, RunDirLock
    from hm3jax.train import main as train

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    holder = RunDirLock(run).acquire()  # another train process, as far as the lock can tell
    try:
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        before = tree_hashes(tmp_path)
        assert train(["--output_dir", str(run), "--models.zoo.dir", str(tmp_path / "zoo")]) == 2
        one_line_error(capsys, rf"output_dir {re.escape(str(run))} is in use by process {os.getpid()}",
                       re.escape(LOCK_FILE))
        assert tree_hashes(tmp_path) == before
    finally:
        holder.release()
    # released: the next one takes it
    with RunDirLock(run):
        pass


def test_a_dead_processs_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from hm3jax.rundir import LOCK_FILE, RunDirLock

    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (run / LOCK_FILE).write_text(f"{p.pid} somehost\n")  # left by a killed run
    with RunDirLock(run) as lock:
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        assert lock.path == str(run / LOCK_FILE)


def test_the_exclusive_file_fallback_takes_over_only_dead_locks(tmp_path, monkeypatch):
    """Without flock (some network file systems): exclusive create, a dead pid's lock taken over."""
    import fcntl

    from hm3jax.rundir import LOCK_FILE, RunDirBusyError, RunDirLock, _host

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    a = RunDirLock(run).acquire()
    with pytest.raises(RunDirBusyError, match=f"in use by process {os.getpid()}"):
        RunDirLock(run).acquire()
    a.release()
    assert not (run / LOCK_FILE).exists()
    (run / LOCK_FILE).write_text(f"999999999 {_host()}\n")  # no such pid
    with RunDirLock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())


# --------------------------------------------------------------- 3. corrupt stage checkpoints
def _flip_data(store, name):
    """Flip one bit in the middle of every ocdbt data file of a stage checkpoint."""
    p = store._stage_path(name)
    for r, _, fs in os.walk(p):
        for f in fs:
            if os.path.basename(r) == "d":
                path = os.path.join(r, f)
                b = bytearray(open(path, "rb").read())
                b[len(b) // 2] ^= 0x01
                open(path, "wb").write(bytes(b))


@pytest.mark.parametrize("damage", ["metadata_truncated", "metadata_emptied", "empty_dir", "flipped_data",
                                    "not_a_directory"])
def test_corrupt_stage_checkpoint_is_named_and_recomputed(tmp_path, capsys, damage):
    from hm3jax.run.stages import run_stage
    from hm3jax.run.store import CorruptCheckpointError, StageStore

    store = StageStore(str(tmp_path / "run"))
    want = {"x": np.arange(300, dtype=np.float32), "ideal": np.ones(3, np.float32)}
    store.save("references", want)
    p = store._stage_path("references")
    if damage.startswith("metadata"):
        meta = os.path.join(p, "_METADATA")
        data = open(meta, "rb").read()
        open(meta, "wb").write(data[: len(data) // 2] if damage == "metadata_truncated" else b"")
    elif damage == "empty_dir":
        import shutil

        shutil.rmtree(p)
        os.mkdir(p)
    elif damage == "not_a_directory":
        import shutil

        shutil.rmtree(p)
        open(p, "w").write("x")
    else:  # one flipped bit in each data file: orbax restores some of them silently, the digest sees it
        _flip_data(store, "references")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*references is corrupt or incomplete "
                                                        r"\(.*\); remove it to recompute that stage"):
        store.load("references")
    calls = []

    class Ctx:
        pass

    ctx = Ctx()
    ctx.store, ctx.log = store, lambda record: None

    def compute():
        calls.append(1)
        return want

    out = run_stage(ctx, "references", compute, lambda o: "ok", None)
    err = capsys.readouterr().err
    assert calls == [1] and "is corrupt or incomplete" in err and "recomputing that stage" in err
    np.testing.assert_array_equal(out["x"], want["x"])
    np.testing.assert_array_equal(store.load("references")["x"], want["x"])  # saved again, sound


def test_a_full_disk_during_a_stage_checkpoint_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    from hm3jax.run.store import CheckpointWriteError, StageStore

    store = StageStore(str(tmp_path / "run"))
    store.save("references", {"x": np.zeros(3, np.float32)})
    before = tree_hashes(tmp_path)

    def full(self, path, *a, **k):
        os.makedirs(f"{path}.orbax-checkpoint-tmp-1", exist_ok=True)  # what orbax leaves mid-write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device while writing \S*/checkpoints/"
                                                      r"stages/upper$"):
        store.save("upper", {"x": np.zeros(3, np.float32)})
    assert tree_hashes(tmp_path) == before  # the finished stage kept, no partial one


# ---------------------------------------------------- 5. readers: FIFOs, deep nesting, types
@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00001.safetensors", "config.json"])
def test_a_fifo_inside_a_model_directory_is_refused_not_opened(tmp_path, capsys, name):
    from reliability_helpers import write_model

    from hm3jax.merging.__main__ import main as merge

    a = write_model(tmp_path / "a", seed=0)
    b = write_model(tmp_path / "b", seed=1)
    target = os.path.join(b, name)
    if name.startswith("model"):
        os.remove(os.path.join(b, "model.safetensors"))
    else:
        os.remove(target)
    os.mkfifo(target)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]}))
    before = tree_hashes(tmp_path)
    with _FifoWatchdog(target) as dog:
        rc = merge([str(recipe), str(tmp_path / "out"), "--quiet"])
    assert not dog.fired and rc == 2, rc
    one_line_error(capsys, re.escape(name), r"FIFO \(named pipe\)|no config\.json")  # refused unopened
    assert tree_hashes(tmp_path) == before


def test_fifos_as_recipe_task_file_and_front_are_refused(run_copy, tmp_path, capsys):
    from hm3jax.merging.__main__ import main as merge
    from hm3jax.objectives.taskfiles import TaskFileError, read_task_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.remove(run_copy / "front.json")
    os.mkfifo(run_copy / "front.json")
    with _FifoWatchdog(fifo, run_copy / "front.json") as dog:
        assert merge([str(fifo), str(tmp_path / "out"), "--quiet"]) == 2
        one_line_error(capsys, "FIFO")
        with pytest.raises(TaskFileError, match="tasks.files.math.search: .*pipe: is a FIFO"):
            read_task_file(fifo, "gsm8k", "tasks.files.math.search")
        assert recommend([str(run_copy), "--preference", "1,1,1"]) == 2
        one_line_error(capsys, r"front\.json: is a FIFO")
    assert not dog.fired


@pytest.mark.parametrize("recipe,words", [
    ({"merge_method": "linear", "models": 5}, "models must be a list of models, got int 5"),
    ({"merge_method": "passthrough", "slices": 7}, "slices must be a list of slices, got int 7"),
    ({"merge_method": "karcher", "models": ["A", "B"], "parameters": {"max_iter": float("inf")}},
     r"parameter max_iter: inf is not a valid finite int"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 2**70}}, "B"],
      "parameters": {"normalize": True}}, None),
    ({"merge_method": "linear", "models": ["A", "B"], "tokenizer": {"pad_to_multiple_of": 10**11}},
     r"pad_to_multiple_of 100000000000 is too large"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply|not valid YAML"),
])
def test_recipe_fields_are_checked_for_their_types(tmp_path, capsys, recipe, words):
    from reliability_helpers import write_model

    from hm3jax.merging.__main__ import main as merge

    a = write_model(tmp_path / "a", seed=0)
    b = write_model(tmp_path / "b", seed=1)
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe).replace("A", a).replace(" B", " " + b)
    (tmp_path / "r.yml").write_text(text)
    before = tree_hashes(tmp_path)
    rc = merge([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"])
    if words is None:  # a huge but finite weight: merged fine (normalised) or refused, never a traceback
        assert rc in (0, 2)
        return
    assert rc == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("line,words", [
    ('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + ', "answer": "1"}', "line 2: nested too deeply"),
    ('{"prompt": "a \\ud800 b", "answer": "1"}', r"line 2: 'prompt' holds a lone surrogate \(\\ud800"),
    ('{"prompt": "x", "answer": "' + "9" * 5000 + '", "n": ' + "9" * 5000 + "}", "line 2: not a JSON object"),
])
def test_task_file_lines_that_break_parsers_are_refused_before_any_run_directory(tmp_path, monkeypatch, capsys,
                                                                                  line, words):
    from reliability_helpers import write_model

    from hm3jax.train import main as train

    monkeypatch.chdir(tmp_path)
    good = '{"prompt": "2+2=", "answer": "4"}\n'
    for t in TASKS:
        (tmp_path / f"{t}.jsonl").write_text(good + (line + "\n" if t == "code" else ""))
    models = {n: write_model(tmp_path / "models" / n, seed=i) for i, n in enumerate(["base", *TASKS])}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "models": {"checkpoints": {"base": models["base"], "experts": {t: models[t] for t in TASKS}}},
        "tasks": {"kind": "files", "files": {t: {"search": f"{t}.jsonl", "heldout": f"{t}.jsonl"} for t in TASKS}}}))
    args = ["--config_path", str(tmp_path / "run.yaml")]
    before = tree_hashes(tmp_path)
    assert train(args) == 2
    one_line_error(capsys, r"tasks\.files\.code\.(search|heldout): .*code\.jsonl " + words)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "run").exists()


# ------------------------------------------- 3 + 4 end to end: resume over a corrupt checkpoint
@pytest.mark.slow
def test_resume_recomputes_a_corrupt_stage_and_keeps_the_rest(small_zoo, tmp_path, monkeypatch, capsys):
    """A smoke run stopped after its upper level; the references checkpoint then loses a bit: the
    next run names it, recomputes the same references and takes the upper level from its checkpoint."""
    from hm3jax.run.store import StageStore
    from hm3jax.train import main as train

    smoke = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.yaml")
    args = ["--config_path", smoke, "--output_dir", str(tmp_path / "run"), "--models.zoo.dir", str(small_zoo[0])]
    monkeypatch.setenv("HM3JAX_STOP_AFTER", "upper")
    assert train(args) == 3
    store = StageStore(str(tmp_path / "run"))
    refs = store.load("references")
    _flip_data(store, "references")
    capsys.readouterr()
    assert train(args) == 3
    out = capsys.readouterr()
    assert "references is corrupt or incomplete" in out.err and "recomputing that stage" in out.err
    assert "[upper]" in out.err and "from checkpoint" in out.err.split("[upper]")[1].splitlines()[0]
    again = store.load("references")
    for k in refs:
        np.testing.assert_array_equal(again[k], refs[k])
