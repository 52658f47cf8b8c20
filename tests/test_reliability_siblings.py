"""Issue 24, the siblings: the same classes of bad input (non-finite or out-of-range numbers,
unwritable outputs, FIFOs, missing files, a full disk, huge values) against the commands and
readers the first pass did not cover: search.baselines, the merge's tokenizer loads (vocabulary,
chat template), chunk checkpoints, karcher's max_iter, demo, memplan, recommend --export and
export_path. Each refusal is one line (exit 2 from a CLI) naming the file, field or flag, and
nothing is left half-written: the test directory is hashed before and after. All in-process, fast.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import yaml
from reliability_helpers import FifoWatchdog, one_line_error, tree_hashes, write_model

from hm3jax.recommend import main as recommend


def _no_work(*a, **k):
    raise AssertionError("work started before the arguments were checked")


# ------------------------------------------------------------------ python -m hm3jax.search.baselines
@pytest.mark.parametrize("args,words", [
    (["--density", "nan"], r"--density: expected a finite number in \(0, 1\], got nan"),
    (["--density", "inf"], r"--density: .* got inf"),
    (["--density", "0"], r"--density: .* got 0\.0"),
    (["--density", "1.5"], r"--density: .* got 1\.5"),
    (["--scale", "nan"], r"--scale: expected a finite number > 0, got nan"),
    (["--scale=-inf"], r"--scale: .* got -inf"),
    (["--scale", "0"], r"--scale: .* got 0\.0"),
    (["--preferences", "0"], r"--preferences: expected an integer in \[1, 100000\], got 0"),
    (["--preferences", str(10**12)], r"--preferences: .* got 1000000000000"),
    (["--seed", str(2**70)], r"--seed: expected an integer in \[0, 4294967296\)"),
    (["--out", "/proc/1/x.json"], r"--out /proc/1/x\.json: cannot create files in /proc/1"),
    (["--out", "FILE/x.json"], r"--out .*FILE/x\.json: .*FILE is not a directory \(a file is in the way\)"),
    (["--out", "DIR"], r"--out .*DIR is a directory; give the path of a JSON file"),
])
def test_baselines_cli_refuses_bad_flags_before_any_work(tmp_path, monkeypatch, capsys, args, words):
    import hm3jax.zoo
    from hm3jax.search.baselines import main as baselines

    monkeypatch.setattr(hm3jax.zoo, "load_zoo", _no_work)
    (tmp_path / "FILE").write_text("keep")
    (tmp_path / "DIR").mkdir()
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR")) for a in args]
    before = tree_hashes(tmp_path)
    assert baselines([str(tmp_path / "zoo"), *args]) == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


def test_baselines_cli_names_a_missing_zoo(tmp_path, capsys):
    from hm3jax.search.baselines import main as baselines

    assert baselines([str(tmp_path / "nozoo"), "--out", str(tmp_path / "s.json")]) == 2
    one_line_error(capsys, r"nozoo")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ tokenizer loads of the merge
def _fifo_tokenizer(tmp_path, name="tokenizer.json"):
    a = write_model(tmp_path / "a", seed=0)
    b = write_model(tmp_path / "b", seed=1)
    fifo = os.path.join(b, name)
    os.mkfifo(fifo)
    return a, b, fifo


@pytest.mark.parametrize("name", ["tokenizer.json", "special_tokens_map.json", "chat_template.jinja"])
def test_tokenizer_loads_refuse_a_fifo_before_opening_it(tmp_path, name):
    from hm3jax.io.paths import NotRegularFileError
    from hm3jax.merging.chat_template import _template_of, save_with_template
    from hm3jax.merging.vocab import _load_tokenizer

    _, b, fifo = _fifo_tokenizer(tmp_path, name)
    words = rf"{fifo}: is a FIFO \(named pipe\), not a regular tokenizer file"
    with FifoWatchdog(fifo) as dog:
        with pytest.raises(NotRegularFileError, match=words):
            _load_tokenizer(b)
        with pytest.raises(NotRegularFileError, match=words):
            _template_of(b)
        with pytest.raises(NotRegularFileError, match=words):
            save_with_template(b, None, str(tmp_path / "out"))
    assert not dog.fired and not (tmp_path / "out").exists()


def test_merge_with_a_fifo_tokenizer_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    from hm3jax.merging.__main__ import main as merge

    a, b, fifo = _fifo_tokenizer(tmp_path)
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}], "chat_template": "auto"}))
    before = tree_hashes(tmp_path)
    with FifoWatchdog(fifo) as dog:
        rc = merge([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"])
    assert not dog.fired and rc == 2
    one_line_error(capsys, rf"{fifo}: is a FIFO")
    assert tree_hashes(tmp_path) == before


# ------------------------------------------------------------------ karcher max_iter
@pytest.mark.parametrize("value,words", [
    (float("inf"), r"parameter max_iter: inf is not a valid finite int"),
    (float("nan"), r"parameter max_iter: nan is not a valid finite int"),
    (2**40, r"parameter max_iter: 1099511627776 is not a valid finite int"),
    (-1, r"karcher: parameter max_iter must be an integer in \[0, 100000\], got -1"),
    (10**6, r"karcher: parameter max_iter must be an integer in \[0, 100000\], got 1000000"),
])
def test_karcher_max_iter_errors_name_the_parameter(tmp_path, capsys, value, words):
    from hm3jax.merging.__main__ import main as merge

    a = write_model(tmp_path / "a", seed=0)
    b = write_model(tmp_path / "b", seed=1)
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"merge_method": "karcher", "models": [a, b],
                                                    "parameters": {"max_iter": value}}))
    before = tree_hashes(tmp_path)
    assert merge([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


# ------------------------------------------------------------------ a full disk at a chunk checkpoint
def test_a_full_disk_at_a_chunk_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from hm3jax.io.atomic import CheckpointWriteError
    from hm3jax.search.hooks import _save_chunk

    ckpt = tmp_path / "checkpoints" / "lower"
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    tree = {"state": {"w": np.arange(6, dtype=np.float32)}, "history": {"r": np.zeros((2, 3), np.float32)}}
    mngr = ocp.CheckpointManager(str(ckpt), options=opts)
    _save_chunk(mngr, 1, tree)
    before = tree_hashes(tmp_path)

    def full(self, step, *a, **k):
        os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-7"))  # what orbax leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointWriteError, match=rf"^no space left on device while writing {ckpt}/2$"):
        _save_chunk(mngr, 2, tree)
    assert tree_hashes(tmp_path) == before  # chunk 1 intact, nothing of chunk 2
    monkeypatch.undo()
    with ocp.CheckpointManager(str(ckpt), options=opts) as again:
        assert again.latest_step() == 1


# ------------------------------------------------------------------ python -m hm3jax.demo / memplan
@pytest.mark.parametrize("args,words", [
    (["--new-tokens", "-1"], r"--new-tokens: expected an integer in \[0, 100000\], got -1"),
    (["--new-tokens", str(10**12)], r"--new-tokens: .* got 1000000000000"),
    (["--prompt", "a \ud800 b"], r"--prompt: not valid UTF-8 text"),
])
def test_demo_refuses_bad_flags_before_loading_a_model(tmp_path, monkeypatch, capsys, args, words):
    import hm3jax.demo as demo

    monkeypatch.setattr(demo, "load_pretrained", _no_work)
    assert demo.main(["--model", str(tmp_path / "m"), *args]) == 2
    one_line_error(capsys, words)


def test_demo_names_a_missing_or_fifo_model_in_one_line(tmp_path, capsys):
    import hm3jax.demo as demo

    assert demo.main(["--model", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, r"missing: no such file or directory")
    m = write_model(tmp_path / "m")
    os.remove(os.path.join(m, "config.json"))
    os.mkfifo(os.path.join(m, "config.json"))
    before = tree_hashes(tmp_path)
    with FifoWatchdog(os.path.join(m, "config.json")) as dog:
        assert demo.main(["--model", m]) == 2
    assert not dog.fired
    one_line_error(capsys, r"config\.json: is a FIFO|no config\.json")  # refused unopened
    assert tree_hashes(tmp_path) == before


def test_memplan_refuses_arguments_it_would_ignore(capsys):
    from hm3jax.memplan import main as memplan

    with pytest.raises(SystemExit) as e:
        memplan(["--model", "llama2-7b"])
    assert e.value.code == 2 and "unrecognized arguments: --model llama2-7b" in capsys.readouterr().err
    assert memplan([]) == 0 and "| model | devices |" in capsys.readouterr().out


# ------------------------------------------------------------------ recommend --export / export_path
@pytest.mark.parametrize("where,words", [
    ("read_only", r"--export /proc/1/hm3jax-export: cannot create files in /proc/1"),
    ("below_file", r"--export .*notes\.txt/export: .*is not a directory \(a file is in the way\)"),
])
def test_recommend_refuses_an_unwritable_export_dir_before_any_work(run_copy, tmp_path, monkeypatch, capsys,
                                                                     where, words):
    import hm3jax.io

    monkeypatch.setattr(hm3jax.io, "load_pretrained", _no_work)
    (tmp_path / "notes.txt").write_text("keep")
    out = "/proc/1/hm3jax-export" if where == "read_only" else str(tmp_path / "notes.txt" / "export")
    before = tree_hashes(tmp_path)
    assert recommend([str(run_copy), "--preference", "1,1,1", "--export", out]) == 2
    one_line_error(capsys, words)
    assert tree_hashes(tmp_path) == before


def test_export_path_refuses_an_unwritable_directory_before_building_tensors(tmp_path, monkeypatch):
    import hm3jax.export
    import hm3jax.run.export as export
    from hm3jax.io.atomic import UnwritableOutputError

    assert hm3jax.export.export_path is export.export_path  # the public name of run.export's
    monkeypatch.setattr(export, "path_params", _no_work)
    (tmp_path / "notes.txt").write_text("keep")
    before = tree_hashes(tmp_path)
    for out, words in (("/proc/1/hm3jax-export", r"export output /proc/1/hm3jax-export: cannot create files in /proc/1"),
                       (str(tmp_path / "notes.txt" / "a" / "b"), r"notes\.txt/a/b: .*notes\.txt is not a directory")):
        with pytest.raises(UnwritableOutputError, match=words):
            export.export_path(out, None, {}, [("base", 0)], "base")
    assert tree_hashes(tmp_path) == before
