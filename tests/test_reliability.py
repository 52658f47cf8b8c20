"""Issue 13: no user data lost, no file outside a model read, no silent garbage.

Every case asserts the error (type and the words naming the culprit) and that nothing outside the
output changed: the whole test directory (inputs and neighbours) is hashed before and after.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from reliability_helpers import llama_config, llama_tensors, tree_hashes, write_model

from hm3jax.io import CheckpointError, CheckpointReader, load_pretrained, save_pretrained
from hm3jax.io.atomic import (
    UnsafeOutputError,
    atomic_output_dir,
    check_output_path,
    clean_stale_temp_dirs,
    temp_dirs,
    write_json_atomic,
)
from hm3jax.merging.__main__ import main
from hm3jax.models.config import ConfigError, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def models(tmp_path):
    """tmp/models/{a,b} (2 layers each), tmp/models/thesis.txt, tmp/r.yml (linear a + b)."""
    m = tmp_path / "models"
    write_model(m / "a", seed=0)
    write_model(m / "b", seed=1)
    (m / "thesis.txt").write_text("four years of work\n")
    recipe = {"merge_method": "linear", "models": [{"model": str(m / "a"), "parameters": {"weight": 0.5}},
                                                    {"model": str(m / "b"), "parameters": {"weight": 0.5}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    return m


def snap(tmp_path) -> dict[str, str]:
    """Hashes of everything under tmp_path but the recipe the test itself (re)writes."""
    return {k: v for k, v in tree_hashes(tmp_path).items() if k != "r.yml"}


def run_cli(tmp_path, recipe, out, *extra):
    cfg = tmp_path / "r.yml"
    if recipe is not None:
        cfg.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
    return main([str(cfg), str(out), "--quiet", *extra])


def linear(*paths, weights=None, **over):
    weights = weights or [0.5] * len(paths)
    r = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}}
                                               for p, w in zip(paths, weights)]}
    r.update(over)
    return r


def expect_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    for w in words:
        assert re.search(w, err), (w, err)
    return err


# ----------------------------------------------------------------------------- 2. --overwrite
@pytest.mark.parametrize("case", ["equal", "equal_slash", "symlink", "contains", "inside", "recipe"])
def test_output_overlapping_an_input_is_refused(tmp_path, models, capsys, case):
    if case == "symlink":
        os.symlink(models / "a", tmp_path / "link")
    out = {"equal": models / "a", "equal_slash": f"{models / 'a'}/", "symlink": tmp_path / "link",
           "contains": models, "inside": models / "b" / "merged", "recipe": tmp_path}[case]
    why = {"equal": "is the input", "equal_slash": "is the input", "symlink": "is the input",
           "contains": "contains the input", "inside": "lies inside the input",
           "recipe": "contains the input"}[case]
    before = snap(tmp_path)
    assert run_cli(tmp_path, None, out, "--overwrite") == 2
    expect_error(capsys, why, re.escape(str(models / ("b" if case == "inside" else "a")))
                 if case != "recipe" else re.escape(str(tmp_path)))
    assert snap(tmp_path) == before


def test_save_pretrained_refuses_overlap_with_tokenizer_source(tmp_path):
    cfg = ModelConfig(**{k: v for k, v in llama_config().items()
                         if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "max_position_embeddings")})
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (tmp_path / "neighbour.txt").write_text("keep me")
    params = load_pretrained(write_model(tmp_path / "m"))[1]
    before = snap(tmp_path)
    for out, why in [(src, "is the input"), (tmp_path, "contains the input"), (src / "sub", "lies inside")]:
        with pytest.raises(UnsafeOutputError, match=why):
            save_pretrained(out, cfg, params, tokenizer_from=src, overwrite=True)
    assert snap(tmp_path) == before


def test_overwrite_never_replaces_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "work")
    before = snap(tmp_path)
    for out in (tmp_path / "work", tmp_path):
        with pytest.raises(UnsafeOutputError, match="contains the current directory"):
            with atomic_output_dir(out, overwrite=True):
                raise AssertionError("body must not run")
    assert snap(tmp_path) == before


def test_json_writer_refuses_inputs_and_directories(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "zoo.json").write_text("{}")
    before = snap(tmp_path)
    with pytest.raises(UnsafeOutputError, match="lies inside the input"):
        write_json_atomic(tmp_path / "zoo" / "zoo.json", {"a": 1}, inputs=[tmp_path / "zoo"])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_json_atomic(tmp_path / "zoo", {"a": 1})
    assert snap(tmp_path) == before
    check_output_path(tmp_path / "other.json", [tmp_path / "zoo", None])  # fine


# ------------------------------------------------------------------ 4. interrupted runs
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_are_removed_and_live_ones_kept(tmp_path):
    from hm3jax.io.atomic import _host_tag

    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("new")
    dead, host = _dead_pid(), _host_tag()
    stale = tmp_path / f".out.tmp-{dead}-{host}-0123abcd"
    live = tmp_path / f".out.tmp-{os.getpid()}-{host}-0123abcd"
    legacy = tmp_path / ".out.tmp-89abcdef"  # an older version's name: no PID, owner unknown
    foreign = tmp_path / f".out.tmp-{dead}-0000beef-0123abcd"  # another host: cannot tell
    for d in (stale, live, legacy, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    assert {p: s for p, _, _, s in temp_dirs(out)} == {
        str(foreign): False, str(legacy): False, str(live): False, str(stale): True}
    removed, kept = clean_stale_temp_dirs(out)
    assert removed == [str(stale)] and sorted(kept) == sorted(map(str, (live, legacy, foreign)))
    assert not stale.exists() and live.exists() and (out / "f").read_text() == "new"
    # The writer died between moving the old output aside and moving the new one in: restore it.
    (out / "f").write_text("old")
    old = tmp_path / f".out.old-{dead}-{host}-0123abcd"
    os.rename(out, old)
    newer = tmp_path / f".out.tmp-{dead}-{host}-4567abcd"
    newer.mkdir()
    removed, _ = clean_stale_temp_dirs(out)
    assert sorted(removed) == sorted([str(old), str(newer)])
    assert (out / "f").read_text() == "old" and not old.exists() and not newer.exists()


def test_json_writer_removes_temp_files_of_killed_writers(tmp_path):
    from hm3jax.io.atomic import _host_tag

    stale = tmp_path / f".zoo.json.tmp-{_dead_pid()}-{_host_tag()}-0123abcd"
    live = tmp_path / f".zoo.json.tmp-{os.getpid()}-{_host_tag()}-0123abcd"
    stale.write_text("{half")
    live.write_text("{half")
    write_json_atomic(tmp_path / "zoo.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "zoo.json"])
    assert json.loads((tmp_path / "zoo.json").read_text()) == {"a": 1}


def test_interrupt_in_process_stops_between_tensors(tmp_path, models, capsys, monkeypatch):
    """SIGINT during a CLI merge (handled in-process): exit 130, one line, old output and inputs
    unchanged, no temporary directory, no merge thread left running."""
    from hm3jax.io import safetensors_writer

    out = tmp_path / "out"
    assert run_cli(tmp_path, None, out) == 0
    before = snap(tmp_path)
    handler_before = signal.getsignal(signal.SIGINT)
    real = safetensors_writer.ShardedWriter.write
    calls = []

    def write_then_signal(self, name, array):
        calls.append(name)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, name, array)

    monkeypatch.setattr(safetensors_writer.ShardedWriter, "write", write_then_signal)
    capsys.readouterr()
    assert run_cli(tmp_path, None, out, "--overwrite") == 130
    err = capsys.readouterr().err
    assert err == f"interrupted by SIGINT; {out} was not written or changed\n"
    assert snap(tmp_path) == before
    assert not [t for t in threading.enumerate() if t.name.startswith("hm3jax-merge")]
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored (SIG_IGN under a non-interactive shell)
    from hm3jax.io import interrupt

    assert interrupt.requested() is None  # forgotten: later runs in this process are not interrupted
    assert run_cli(tmp_path, None, out, "--overwrite") == 0


def test_keyboard_interrupt_in_library_leaves_nothing(tmp_path, models, monkeypatch):
    """Without the CLI's handler: a KeyboardInterrupt raised in the writer thread's work still
    stops the merge, joins its threads and removes the temporary directory."""
    from hm3jax.io import safetensors_writer
    from hm3jax.merging.stream import merge_recipe

    def interrupted(self, name, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_writer.ShardedWriter, "write", interrupted)
    before = snap(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        merge_recipe(str(tmp_path / "r.yml"), tmp_path / "out", progress=False)
    assert snap(tmp_path) == before
    assert not [t for t in threading.enumerate() if t.name.startswith("hm3jax-merge")]


def test_reader_close_waits_for_reads_in_flight(tmp_path, monkeypatch):
    path = write_model(tmp_path / "m")
    reader = CheckpointReader(path)
    started, release = threading.Event(), threading.Event()
    real = os.preadv

    def slow(fd, bufs, offset):
        started.set()
        release.wait(5)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", slow)
    got = []
    t = threading.Thread(target=lambda: got.append(reader.read("model.norm.weight")))
    t.start()
    started.wait(5)
    closer = threading.Thread(target=reader.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # waits for the read instead of closing its descriptor under it
    release.set()
    t.join(5)
    closer.join(5)
    assert not closer.is_alive() and got and got[0].shape == (16,) and not reader._fds


# ----------------------------------------------------------------------- 5. path traversal
def _index_model(tmp_path, shard_name):
    """Model `m` whose index points model.norm.weight at `shard_name`; `other/` holds a shard."""
    m = write_model(tmp_path / "m", max_shard_size=2000)
    other = write_model(tmp_path / "other", max_shard_size=2000)
    index_path = os.path.join(m, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.norm.weight"] = shard_name(m, other, index["weight_map"]["model.norm.weight"])
    with open(index_path, "w") as f:
        json.dump(index, f)
    return m


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink"])
def test_shard_names_must_stay_inside_the_model(tmp_path, capsys, case):
    def name(m, other, shard):
        if case == "absolute":
            return os.path.join(other, shard)
        if case == "dotdot":
            return f"../other/{shard}"
        os.symlink(os.path.join(other, shard), os.path.join(m, "linked.safetensors"))
        return "linked.safetensors"

    m = _index_model(tmp_path, name)
    before = snap(tmp_path)
    words = {"absolute": "not a plain relative path", "dotdot": "not a plain relative path",
             "symlink": "outside the model directory"}[case]
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: weight_map\['model\.norm\.weight'\].*{words}"):
        load_pretrained(m)
    recipe = linear(m, m.replace("/m", "/other"))
    assert run_cli(tmp_path, recipe, tmp_path / "out") == 2
    expect_error(capsys, r"index\.json: weight_map", words)
    assert snap(tmp_path) == before


def test_hub_cache_snapshot_links_are_allowed(tmp_path):
    """Files of an HF hub cache snapshot link to ../../blobs: that is inside the repository."""
    src = write_model(tmp_path / "src")
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in os.listdir(src):
        os.rename(os.path.join(src, f), repo / "blobs" / f"sha-{f}")
        os.symlink(f"../../blobs/sha-{f}", snap / f)
    cfg, _ = load_pretrained(snap)
    assert cfg.num_hidden_layers == 2


def test_errors_never_echo_file_contents(tmp_path, capsys):
    secret = b"root:x:0:0:root:/root:/bin/bash\nSECRET-TOKEN-123\n" * 4
    m = write_model(tmp_path / "m")
    with open(os.path.join(m, "model.safetensors"), "wb") as f:
        f.write(secret)
    declared = str(struct.unpack("<Q", secret[:8])[0])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(m)
    assert "not a safetensors file" in str(e.value)
    for leak in (declared, "root:x", "SECRET"):
        assert leak not in str(e.value)
    # A valid length followed by non-JSON bytes: the message gives a position, not the bytes.
    with open(os.path.join(m, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 40) + secret)
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        CheckpointReader(m)
    assert "root:x" not in str(e.value) and "SECRET" not in str(e.value)
    with open(os.path.join(m, "config.json"), "wb") as f:
        f.write(b"\xffSECRET-TOKEN-123")
    with pytest.raises(ConfigError, match=r"config\.json: not UTF-8") as e:
        load_pretrained(m)
    assert "SECRET" not in str(e.value)


# ------------------------------------------------------------------- 8. silent wrong results
@pytest.mark.parametrize("weights", [[0, 0], [-1, 1]])
def test_zero_sum_weights_with_normalize_are_refused(tmp_path, models, capsys, weights):
    before = snap(tmp_path)
    assert run_cli(tmp_path, linear(models / "a", models / "b", weights=weights), tmp_path / "out") == 2
    expect_error(capsys, r"tensor model\.embed_tokens\.weight: the weights", "sum to 0", "normalize: false")
    assert snap(tmp_path) == before


def test_nonfinite_input_is_an_error_or_with_a_flag_a_warning(tmp_path, capsys):
    t = llama_tensors(llama_config(), seed=2)
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = np.inf
    bad = write_model(tmp_path / "bad", tensors=t)
    good = write_model(tmp_path / "good", seed=3)
    before = snap(tmp_path)
    recipe = linear(good, bad)
    assert run_cli(tmp_path, recipe, tmp_path / "out") == 2
    expect_error(capsys, re.escape(f"model {bad}: tensor model.layers.1.mlp.up_proj.weight"),
                 "2 NaN/Inf", "--allow-nonfinite")
    assert snap(tmp_path) == before
    assert run_cli(tmp_path, None, tmp_path / "out", "--allow-nonfinite") == 0
    err = capsys.readouterr().err
    assert "warning: model" in err and "up_proj" in err and "merged tensor model.layers.1.mlp.up_proj" in err
    assert np.isnan(CheckpointReader(tmp_path / "out").read("model.layers.1.mlp.up_proj.weight")).any()


def test_nonfinite_merged_tensor_is_never_written_silently(tmp_path, models, capsys):
    # Finite inputs, weights whose products overflow float32.
    recipe = linear(models / "a", models / "b", weights=[3e38, 3e38], parameters={"normalize": False})
    before = snap(tmp_path)
    assert run_cli(tmp_path, recipe, tmp_path / "out") == 2
    expect_error(capsys, r"merged tensor model\.\S+: \d+ of \d+ values are NaN/Inf", "nothing was written")
    assert snap(tmp_path) == before


# ------------------------------------------------------------------------- 9. layer counts
def test_models_form_refuses_different_layer_counts(tmp_path, capsys):
    two = write_model(tmp_path / "two", llama_config(layers=2))
    three = write_model(tmp_path / "three", llama_config(layers=3))
    before = snap(tmp_path)
    assert run_cli(tmp_path, linear(two, three), tmp_path / "out") == 2
    expect_error(capsys, re.escape(f"{two} has 2"), re.escape(f"{three} has 3"), "slices")
    assert snap(tmp_path) == before
    # Slices say which layers: allowed.
    sliced = {"merge_method": "linear", "slices": [{"sources": [
        {"model": two, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": three, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}]}
    assert run_cli(tmp_path, sliced, tmp_path / "out") == 0


# ----------------------------------------------------------------- 10. one-line errors
def _patch_header(path, fn):
    """Rewrite a safetensors file's header through `fn(header dict)`, keeping the data bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_integer_dtype_declared_for_float_weights(tmp_path, capsys):
    m = write_model(tmp_path / "m", seed=0)
    other = write_model(tmp_path / "o", seed=1)
    shard = os.path.join(m, "model.safetensors")
    _patch_header(shard, lambda h: h["model.norm.weight"].update(dtype="I32"))
    before = snap(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: tensor model\.norm\.weight: dtype int32.*"
                                              "expected a float dtype"):
        load_pretrained(m)
    assert run_cli(tmp_path, linear(m, other), tmp_path / "out") == 2
    expect_error(capsys, re.escape(shard), r"tensor model\.norm\.weight: dtype I32", "expected a float dtype")
    assert snap(tmp_path) == before


@pytest.mark.parametrize("field,value,words", [
    ("data_offsets", ["0", "64"], "data_offsets: expected \\[begin, end\\]"),
    ("data_offsets", [64, 0], "data_offsets: expected \\[begin, end\\]"),
    ("shape", ["16"], "shape: expected a list of non-negative integers"),
    ("shape", [8], r"data_offsets \[\d+, \d+\] do not fit shape \[8\]"),
    ("dtype", 5, "dtype int; expected one of F64"),
])
def test_malformed_header_fields(tmp_path, field, value, words):
    m = write_model(tmp_path / "m")
    shard = os.path.join(m, "model.safetensors")
    _patch_header(shard, lambda h: h["model.norm.weight"].update({field: value}))
    before = snap(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: tensor 'model\.norm\.weight': {words}"):
        CheckpointReader(m)
    assert snap(tmp_path) == before


def test_gguf_cut_inside_metadata(tmp_path):
    import gguf

    from hm3jax.io import load_gguf

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:60])  # inside the key/value section
    before = snap(tmp_path)
    with pytest.raises(CheckpointError, match=r"cut\.gguf: corrupt or truncated GGUF file"):
        load_gguf(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError, match=r"cut\.gguf: corrupt or truncated GGUF file"):
        load_pretrained(tmp_path / "cut.gguf")
    assert snap(tmp_path) == before


def test_allow_pickle_without_torch(tmp_path, monkeypatch):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(llama_config()))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    before = snap(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ModuleNotFoundError
    with pytest.raises(CheckpointError, match=r"pt: reading pickle weights \(pytorch_model\.bin\) with "
                                              "allow_pickle=True needs PyTorch"):
        load_pretrained(d, allow_pickle=True)
    assert snap(tmp_path) == before


@pytest.mark.parametrize("case,words", [
    ("gpt2", [r"model_type differ \(.*a is 'llama', .*b is 'gpt2'\)"]),
    ("more_layers", [r"b/config\.json: num_hidden_layers is 3 but model .*b holds 2 layers of model\.layers"]),
    ("bad_layers", [r"b/config\.json: num_hidden_layers is 'two'; expected a positive integer"]),
])
def test_second_model_config_is_validated(tmp_path, capsys, case, words):
    a = write_model(tmp_path / "a", seed=0)
    b = write_model(tmp_path / "b", seed=1)
    cfg = llama_config()
    if case == "gpt2":
        cfg["model_type"] = "gpt2"
    elif case == "more_layers":
        cfg["num_hidden_layers"] = 3
    else:
        cfg["num_hidden_layers"] = "two"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    before = snap(tmp_path)
    assert run_cli(tmp_path, linear(a, b), tmp_path / "out") == 2
    expect_error(capsys, *words)
    assert snap(tmp_path) == before


def test_cli_names_its_own_overwrite_flag(tmp_path, models, capsys):
    (tmp_path / "out").mkdir()
    before = snap(tmp_path)
    assert run_cli(tmp_path, None, tmp_path / "out") == 2
    err = expect_error(capsys, "already exists; pass --overwrite to replace it")
    assert "overwrite=True" not in err
    assert snap(tmp_path) == before


# --------------------------------------------------------------- 4. signals, in a subprocess
def _slow_models(root):
    """Two 300-layer models (tiny tensors): a merge of ~2,700 tensors that lasts seconds."""
    cfg = llama_config(layers=300, hidden=16, inter=32, vocab=32)
    a = write_model(root / "a", cfg, seed=0)
    b = write_model(root / "b", cfg, seed=1)
    (root / "slow.yml").write_text(yaml.safe_dump(linear(a, b)))
    (root / "quick.yml").write_text(yaml.safe_dump(linear(write_model(root / "qa", seed=0),
                                                          write_model(root / "qb", seed=1))))


def _merge_proc(root, recipe, *extra):
    env = {**os.environ, "HM3JAX_NO_HUGE_PAGES": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "hm3jax.merge", str(root / recipe), str(root / "out"),
                             "--overwrite", "--quiet", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _signal_while_merging(root, sig, delay):
    """Start the slow merge, send `sig` `delay` s after its temporary output appears."""
    proc = _merge_proc(root, "slow.yml")
    deadline = time.monotonic() + 120
    while not [e for e in os.listdir(root) if e.startswith(f".out.tmp-{proc.pid}-")]:  # ours, not debris
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the merge ended before the signal: make it slower"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _check_signals(root, sigs, seed):
    rng = np.random.default_rng(seed)
    old = tree_hashes(root / "out")
    for sig in sigs:
        rc, err = _signal_while_merging(root, sig, float(rng.uniform(0, 0.3)))
        assert rc != -signal.SIGSEGV and rc != -signal.SIGABRT, (sig, rc, err)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 128 + sig, (sig, rc, err)
            assert err == f"interrupted by {signal.Signals(sig).name}; {root / 'out'} was not written or changed\n"
            assert not [e for e in os.listdir(root) if e.startswith(".out.")]  # cleaned up at once
        assert tree_hashes(root / "out") == old  # byte-identical
    proc = _merge_proc(root, "quick.yml")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not [e for e in os.listdir(root) if e.startswith(".out.")]  # SIGKILL's debris removed


@pytest.mark.slow
def test_sigint_sigterm_sigkill_of_a_running_merge(tmp_path):
    _slow_models(tmp_path)
    proc = _merge_proc(tmp_path, "quick.yml")
    assert proc.wait(timeout=120) == 0
    _check_signals(tmp_path, [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], seed=0)


@pytest.mark.slow  # ~30-60 s: ten merges started and interrupted
def test_sigint_ten_times_no_segfault(tmp_path):
    _slow_models(tmp_path)
    proc = _merge_proc(tmp_path, "quick.yml")
    assert proc.wait(timeout=120) == 0
    _check_signals(tmp_path, [signal.SIGINT] * 10, seed=1)


def test_cli_reports_temp_dirs_it_cannot_judge(tmp_path, models, capsys):
    """A temporary sibling whose writer may be alive (here: this process) is left and reported."""
    from hm3jax.io.atomic import _host_tag

    live = tmp_path / f".out.tmp-{os.getpid()}-{_host_tag()}-0123abcd"
    live.mkdir()
    assert run_cli(tmp_path, None, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 temporary directory of") and str(live) in err and err.count("\n") == 1
    assert live.is_dir() and (tmp_path / "out" / "config.json").is_file()
