"""The embedded model zoo: targets, caching, safe directories, and parity with transformers."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.models import forward
from hm3jax.objectives import build_tokenizer, exact_match, make_batch, make_suite_batch, task_means
from hm3jax.objectives.synthetic import TASK_NAMES
from hm3jax.zoo import (
    BASE,
    MANIFEST,
    MODEL_NAMES,
    SMALL,
    ZooConfig,
    ZooError,
    build_zoo,
    format_report,
    load_zoo,
)
from hm3jax.zoo.cli import main as zoo_main

N_PER_TASK = 100


# The SMALL zoo is built once per session by the `small_zoo` fixture in conftest.py (shared with
# test_upper.py); `small_zoo_loaded` is its load_zoo.


def test_small_zoo_reaches_its_targets(small_zoo):
    out, manifest, seconds = small_zoo
    scores = manifest["heldout_exact_match"]
    print(f"\nsmall zoo built in {seconds:.1f}s\n" + format_report(manifest))
    assert tuple(scores) == MODEL_NAMES == (BASE, *TASK_NAMES)
    for task in TASK_NAMES:
        assert scores[BASE][task] <= SMALL.max_base_exact_match, (task, scores[BASE])
        assert scores[task][task] >= SMALL.min_expert_exact_match, (task, scores[task])
        others = [scores[m][task] for m in scores if m != task]
        assert scores[task][task] > max(others), (task, scores)
    # some parameter-level merge at the centre preference beats the base on every task
    centre = {m: v["centre"] for m, v in manifest["probe"]["merges"].items()}
    tol = SMALL.merge_tolerance  # the SMALL zoo's math is a few percent: within 2 points of the base
    assert any(all(row[t] > scores[BASE][t] - tol for t in TASK_NAMES) for row in centre.values()), centre
    assert manifest["targets"] == {k: True for k in manifest["targets"]}, manifest["targets"]
    assert manifest["targets_met"] is True
    assert sorted(os.listdir(out)) == sorted([MANIFEST, BASE, *TASK_NAMES])


def test_second_build_is_a_cache_hit(small_zoo, monkeypatch):
    from hm3jax.zoo import build as zoo_build

    out, manifest, _ = small_zoo
    stamps = {n: os.stat(out / n / "model.safetensors").st_mtime_ns for n in manifest["models"]}

    def no_training(*a, **k):
        raise AssertionError("a cached zoo was trained again")

    monkeypatch.setattr(zoo_build, "train_zoo", no_training)
    again = build_zoo(out, SMALL, seed=0, progress=False)
    assert again == manifest == json.loads((out / MANIFEST).read_text())
    assert stamps == {n: os.stat(out / n / "model.safetensors").st_mtime_ns for n in manifest["models"]}
    # Another config or seed must not silently reuse (or silently overwrite) the directory.
    with pytest.raises(ZooError, match="another config, seed or format"):
        build_zoo(out, SMALL, seed=1, progress=False)


def test_config_validation_and_roundtrip():
    assert ZooConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    with pytest.raises(ValueError, match="one count per task"):
        ZooConfig(expert_steps=(100, 100))
    with pytest.raises(ValueError, match="multiple of chunk_steps"):
        ZooConfig(base_steps=101)
    with pytest.raises(ValueError, match="unknown keys"):
        ZooConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match=r"base_mixture\[code\]=9: must be in \[0, n_train\[code\]=5\]"):
        ZooConfig(n_train=(5, 5, 5), base_mixture=(1, 9, 1))
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        ZooConfig(num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"base_hard_near_miss\[translation\]=1.5: must be in \[0, 1\]"):
        ZooConfig(base_hard_near_miss=(0.5, 0.5, 1.5))
    with pytest.raises(ValueError, match=r"base_prompt_loss\[math\]=1: must be true or false"):
        ZooConfig(base_prompt_loss=(1, True, True))
    with pytest.raises(ValueError, match="expert_replay_spread=1: must be true or false"):
        ZooConfig(expert_replay_spread=1)


def test_base_prompt_loss_picks_each_tasks_target_tokens():
    from hm3jax.zoo.data import base_rows, base_training_set

    zc = dataclasses.replace(SMALL, base_mixture=(30, 20, 10), base_prompt_loss=(False, True, False))
    tok = build_tokenizer()
    batch = base_training_set(zc, tok)
    ids = np.asarray(batch.task_id)
    assert np.bincount(ids).tolist() == [30, 20, 10]
    for k in range(3):
        rows = base_rows(zc, k)[:3]
        plain = np.asarray(make_batch(rows, tok, seq_len=zc.seq_len, pad_multiple=4).target_mask)
        got = np.asarray(batch.target_mask)[ids == k][:3]
        answer_tokens = np.asarray([len(a) + 1 for _, a in rows])  # answer characters + EOS
        assert (plain.sum(1) == answer_tokens).all()
        if zc.base_prompt_loss[k]:  # the prompt's tokens too: more targets, the answer's among them
            assert (got.sum(1) > answer_tokens).all() and (got >= plain).all()
        else:
            assert (got == plain).all()


def test_expert_replay_spans_the_base_mixture_hard_rows_included():
    from hm3jax.objectives.synthetic import is_hard
    from hm3jax.zoo.data import base_rows, expert_training_set, replay_rows

    zc = dataclasses.replace(SMALL, base_mixture=(600, 600, 300), base_hard_rows=(600, 200, 0), expert_replay=300,
                             expert_replay_spread=True)
    for k, name in enumerate(TASK_NAMES):
        mixture, replay = base_rows(zc, k), replay_rows(zc, k)
        assert len(replay) == 300 and set(replay) <= set(mixture)
        share = np.mean([is_hard(name, p) for p, _ in mixture])
        assert abs(np.mean([is_hard(name, p) for p, _ in replay]) - share) < 0.01, name
        first = replay_rows(dataclasses.replace(zc, expert_replay_spread=False), k)
        assert first == mixture[:300]  # the mixture's first rows: easy ones only
    batch = expert_training_set(zc, 0, build_tokenizer())  # math's own rows + 300 code + 300 translation
    assert np.bincount(np.asarray(batch.task_id)).tolist() == [3000, 300, 300]


def test_base_hard_rows_carry_the_configured_share_of_near_misses():
    from hm3jax.objectives.synthetic import is_hard
    from hm3jax.zoo.data import base_rows, near_miss

    assert near_miss("ka gu mo bi") == "ka gu bi mo" and near_miss("4 1 3") == "4 3 1"
    assert near_miss("579") == "570" and near_miss("7") == "8"
    zc = dataclasses.replace(SMALL, base_hard_rows=(400, 400, 200), base_hard_near_miss=(0.6, 0.0, 1.0))
    for k, name in enumerate(TASK_NAMES):
        truth = dict(zc.suite()[k].examples("train"))
        rows = base_rows(zc, k)
        hard = [(p, a) for p, a in rows if is_hard(name, p)]
        assert len(hard) == zc.base_hard_rows[k] and len(rows) == zc.base_mixture[k] + len(hard)
        assert all(a == truth[p] for p, a in rows if not is_hard(name, p))  # easy rows stay clean
        missed = [a == near_miss(truth[p]) != truth[p] for p, a in hard]
        assert all(a in (truth[p], near_miss(truth[p])) for p, a in hard)
        share = zc.base_hard_near_miss[k]
        # a hash of the prompt picks the rows: the share holds up to sampling noise (and rows whose
        # near miss equals the answer, e.g. a list ending in two equal digits)
        assert share - 0.1 <= np.mean(missed) <= share + 0.02, (name, np.mean(missed))
        assert rows == base_rows(zc, k)  # deterministic


def test_load_zoo_errors_on_missing_manifest(tmp_path):
    with pytest.raises(ZooError, match="no zoo.json"):
        load_zoo(tmp_path)


def test_loaded_zoo_matches_manifest_scores(small_zoo, small_zoo_loaded):
    _, manifest, _ = small_zoo
    cfg, models, tokenizer = small_zoo_loaded
    assert cfg == SMALL.model_config()
    assert sorted(models) == sorted([BASE, *TASK_NAMES])
    batch = make_suite_batch(SMALL.suite(), "heldout", tokenizer)
    for name, params in models.items():
        em = exact_match(forward(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)), batch)
        scores = np.asarray(task_means(em, batch, len(TASK_NAMES)))
        expected = [manifest["heldout_exact_match"][name][t] for t in TASK_NAMES]
        np.testing.assert_allclose(scores, expected, atol=1e-6, err_msg=name)


def test_probe_of_numpy_params_matches_the_manifest(small_zoo, small_zoo_loaded):
    # experts trained in worker processes reach the probe as numpy arrays, not jax arrays
    import jax

    from hm3jax.zoo import probe_mergeability

    _, manifest, _ = small_zoo
    cfg, models, tokenizer = small_zoo_loaded
    as_numpy = {name: jax.tree.map(np.asarray, params) for name, params in models.items()}
    probe = probe_mergeability(cfg, as_numpy, SMALL, tokenizer, jax.random.key(0))
    assert json.loads(json.dumps(probe)) == manifest["probe"]


def _heldout(n=N_PER_TASK):
    return [ex for task in SMALL.suite() for ex in task.examples("heldout")[:n]]


def test_transformers_loads_expert_with_same_logits_and_tokens(small_zoo, small_zoo_loaded):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = small_zoo[0]
    cfg, models, _ = small_zoo_loaded
    examples = _heldout(20)
    hf_tok = AutoTokenizer.from_pretrained(out / "code")
    ours = build_tokenizer()
    prompts = [p for p, _ in examples] + [p + a for p, a in examples]
    assert hf_tok(prompts)["input_ids"] == ours(prompts)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(out / "code", dtype=torch.float32).eval()
    batch = make_batch(examples, ours)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(batch.tokens, dtype=torch.long),
                       attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long)).logits.numpy()
    mine = np.asarray(forward(cfg, models["code"], jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
    real = batch.attention_mask.astype(bool)  # padded positions are not part of the contract
    assert np.abs(mine - theirs)[real].max() <= 1e-4


@pytest.mark.parametrize("expert", ["code"])
def test_teacher_forced_exact_match_equals_greedy_generation(small_zoo, small_zoo_loaded, expert):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = small_zoo[0]
    cfg, models, _ = small_zoo_loaded
    tok = AutoTokenizer.from_pretrained(out / expert)
    model = AutoModelForCausalLM.from_pretrained(out / expert, dtype=torch.float32).eval()
    examples = _heldout()
    batch = make_batch(examples, build_tokenizer())
    teacher = np.asarray(exact_match(forward(cfg, models[expert], jnp.asarray(batch.tokens),
                                             jnp.asarray(batch.attention_mask)), batch))

    # Prompts of equal token length run as one unpadded batch, so no padding enters generation;
    # max_new_tokens is set per group to the longest answer + 1 (EOS), and each row is cut at its own.
    generated = np.zeros(len(examples))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, answer) in enumerate(examples):
        by_shape.setdefault((len(prompt), len(answer)), []).append(i)
    for (_, answer_len), rows in by_shape.items():
        enc = tok([examples[i][0] for i in rows], return_tensors="pt")
        with torch.no_grad():
            seqs = model.generate(**enc, do_sample=False, max_new_tokens=answer_len + 1,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for i, seq in zip(rows, seqs[:, enc["input_ids"].shape[1]:].tolist()):
            cut = seq[: seq.index(tok.eos_token_id)] if tok.eos_token_id in seq else None
            text = None if cut is None else tok.decode(cut, skip_special_tokens=True)
            generated[i] = float(text == examples[i][1])
    assert 0 < teacher.sum() < len(teacher), "want both hits and misses for a meaningful comparison"
    np.testing.assert_array_equal(teacher, generated)


# ------------------------------------------------------------------ directories the zoo did not write
# A zoo small enough to build in seconds: only the forced-rebuild tests train it.
MICRO = dataclasses.replace(
    SMALL, hidden_size=16, intermediate_size=32, n_eval=20, n_train=(200, 200, 200),
    base_mixture=(40, 40, 20), expert_replay=10, base_steps=60, expert_steps=(60, 60, 60), warmup_steps=10,
    chunk_steps=30)


def _tree_digest(root):
    """{relative path: sha256} of every file under root (to show nothing changed)."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_build_refuses_a_user_directory_and_keeps_its_files(tmp_path, capsys):
    out = tmp_path / "D"
    (out / "base").mkdir(parents=True)
    (out / "base" / "precious.safetensors").write_text("w")
    (out / "thesis.txt").write_text("t")
    before = _tree_digest(tmp_path)
    with pytest.raises(ZooError, match="not a zoo"):
        build_zoo(out, MICRO, progress=False)
    # --force only replaces what a zoo build writes: a file it never writes blocks it
    with pytest.raises(ZooError, match="precious.safetensors"):
        build_zoo(out, MICRO, force=True, progress=False)
    assert zoo_main([str(out), "--config", "small"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a zoo" in err and len(err.strip().splitlines()) == 1
    assert _tree_digest(tmp_path) == before


@pytest.mark.parametrize("content", [b"{", b"[]", b"\xff\xfe\x00garbage", b'{"format": 2}',
                                     b'{"models": ["base"]}'])
def test_corrupt_manifest_is_a_clear_error(tmp_path, content):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(ZooError, match="zoo.json.*--force"):
        load_zoo(tmp_path)
    with pytest.raises(ZooError, match="--force"):
        build_zoo(tmp_path, MICRO, progress=False)
    assert (tmp_path / MANIFEST).read_bytes() == content


@pytest.mark.slow
def test_force_repairs_a_corrupt_manifest_and_keeps_other_files(tmp_path):
    first = build_zoo(tmp_path, MICRO, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / MANIFEST).write_bytes(b"\xff not json")
    again = build_zoo(tmp_path, MICRO, force=True, progress=False)
    assert again["heldout_exact_match"] == first["heldout_exact_match"]  # same config and seed
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert load_zoo(tmp_path)[0] == MICRO.model_config()


def test_old_module_path_warns_and_still_works():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import hm3jax.objectives.zoo\nexcept DeprecationWarning as e:\n    print('warned:', e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "warned: hm3jax.objectives.zoo moved to hm3jax.zoo" in res.stdout, res.stderr


def test_fit_pads_datasets_without_changing_the_run_and_shares_one_program():
    import jax

    from hm3jax.models.decoder import init_params
    from hm3jax.zoo.train import device_batch, fit, init_state, make_schedule, train_chunk

    cfg = dataclasses.replace(SMALL.model_config(), num_hidden_layers=1, hidden_size=16, intermediate_size=16)
    opt = SMALL.optim_config()
    params = init_params(cfg, jax.random.key(0))
    examples = [task.examples("train")[i] for task in SMALL.suite() for i in range(4)]  # 12 rows
    data = make_batch(examples[:5], build_tokenizer(), seq_len=32)
    key = jax.random.key(1)
    settings = dict(steps=4, batch_size=3, learning_rate=1e-2, warmup_steps=1, chunk_steps=2, progress=False)
    before = train_chunk._cache_size()
    got, _ = fit(cfg, opt, params, data, key, **settings)
    # the same run by hand on the unpadded rows: padding is never drawn, so it changes nothing
    state, schedule = init_state(params, opt), make_schedule(1e-2, 1, 4)
    for _ in range(2):
        state, _ = train_chunk(cfg, opt, 3, 2, state, key, device_batch(data), jnp.int32(5), schedule)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, state.params)
    # 5 and 7 rows pad to the same 8: a second dataset of another size reuses the padded program
    after_first = train_chunk._cache_size()
    fit(cfg, opt, params, make_batch(examples[5:12], build_tokenizer(), seq_len=32), key, **settings)
    assert train_chunk._cache_size() == after_first == before + 2  # padded (5->8) and unpadded (5)
