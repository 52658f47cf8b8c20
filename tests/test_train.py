"""python -m hm3jax.train end to end on configs/smoke.yaml: the run directory contract, resuming a
killed run to the same front, recommend --export, and config errors that write nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hm3jax.objectives.synthetic import TASK_NAMES
from hm3jax.zoo import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
REPORT_ROWS = ("| Base |", *(f"| Expert: {t} |" for t in TASK_NAMES), "| Task Arithmetic |", "| TIES |",
               "| DARE-TIES |", "| Random path search |", "| Evolutionary path search |",
               "| HM3 parameter level only |", "| HM3 architecture level only |", "| HM3 full |")

pytestmark = pytest.mark.slow


def _train(out, zoo, *extra, stop_after=None, check=True):
    # the compilation cache of the test run (conftest) is inherited through os.environ
    env = {**os.environ, "HM3JAX_NO_HUGE_PAGES": "1"}
    env.pop("HM3JAX_STOP_AFTER", None)
    if stop_after:
        env["HM3JAX_STOP_AFTER"] = stop_after
    res = subprocess.run([sys.executable, "-m", "hm3jax.train", "--config_path", SMOKE, "--output_dir", str(out),
                          "--models.zoo.dir", str(zoo), *extra], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    if check:
        assert res.returncode == (3 if stop_after else 0), res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def smoke_run(smoke_sweep):
    """The session's unbroken smoke run on the SMALL zoo (conftest.smoke_sweep, run in-process;
    the command line runs in the tests below and in test_train_tasks): (run dir, zoo dir)."""
    return smoke_sweep[0], smoke_sweep[2]


def test_smoke_run_writes_the_run_directory_contract(smoke_run):
    out = smoke_run[0]
    assert {"config.yaml", "front.json", "front.png", "report.md", "metrics.jsonl", "checkpoints"} <= set(os.listdir(out))
    front = json.loads((out / "front.json").read_text())
    assert front["tasks"] == list(TASK_NAMES)
    assert {"hm3", "param_only", "arch_only", "random_path", "evolutionary_path", "task_arithmetic", "ties",
            "dare_ties"} <= set(front["hypervolume"])
    L = SMALL.num_hidden_layers
    names = set(TASK_NAMES) | {"merge", "base"}
    assert len(front["solutions"]) == 3
    for group in [front["solutions"], *front["baselines"].values()]:
        for sol in group:
            assert sol["path"], sol
            for step in sol["path"]:  # paths name real pool entries
                assert step[0] in names and 0 <= step[1] < L, step
            assert len(sol["scores"]["search"]) == len(sol["scores"]["heldout"]) == 3
            assert sol["cost"]["layers"] == len(sol["path"])
            assert isinstance(sol["dominated"], bool)
    picked = {tuple(s["preference"]): s["upper"]["method"] for s in front["baselines"]["param_only"]}
    for sol in front["solutions"]:
        assert {s[0] for s in sol["path"]} <= set(TASK_NAMES) | {"merge"}
        # upper.method auto: the method picked per preference, the same for HM3 and its parameter level
        assert sol["upper"]["method"] in ("task_arithmetic", "ties", "dare_ties")
        assert sol["upper"]["method"] == picked[tuple(sol["preference"])]
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for row in REPORT_ROWS:
        assert row in report, row
    assert "## Where HM3 does not win" in report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"references", "upper", "lower", "heldout", "front"} <= {r.get("stage") for r in records}


def test_every_smoke_record_is_a_solution_to_json(smoke_run):
    """front.json's records (HM3's, every baseline's, the references') are Solution.to_json() records:
    read back with from_json, to_json gives each one again with the same keys in the same order, and
    from_json of that gives the same Solution."""
    from hm3jax.cost import SolutionCost
    from hm3jax.run.record import Solution, UpperSettings

    front = json.loads((smoke_run[0] / "front.json").read_text())
    records = [*front["solutions"], *(s for v in front["baselines"].values() for s in v), *front["references"].values()]
    assert len(records) == 3 * (1 + len(front["baselines"])) + 1 + len(TASK_NAMES)
    for rec in records:
        sol = Solution.from_json(rec)
        assert json.dumps(sol.to_json()) == json.dumps(rec), rec
        assert Solution.from_json(sol.to_json()) == sol
        assert isinstance(sol.cost, SolutionCost) and sol.cost.layers == len(sol.path)
        assert sol.upper is None or isinstance(sol.upper, UpperSettings)
    for rec in front["solutions"]:  # HM3's merges carry their own key
        assert Solution.from_json(rec).upper.key_data == tuple(rec["upper"]["key_data"])


def test_smoke_report_names_a_winner_by_distinct_hypervolumes(smoke_run):
    import re

    from hm3jax.report_text import label

    out = smoke_run[0]
    text = (out / "front.json").read_text()
    front = json.loads(text)
    hv = front["hypervolume"]
    groups = {"hm3": front["solutions"], **front["baselines"]}
    # methods with different non-dominated points have different volumes (param_only and
    # task_arithmetic may share theirs: upper.method auto picks task arithmetic for some λ)
    points = {m: frozenset(tuple(s["scores"]["heldout"]) for s in g if not s["dominated"]) for m, g in groups.items()}
    assert len(set(hv.values())) == len(set(points.values())) >= 6, (hv, points)
    for m in hv:
        assert hv[m] > 0, hv  # the reference point lies below the nadir: no method is zeroed
    report = (out / "report.md").read_text()
    shown = {m: re.search(rf"\| {re.escape(label(m))} \|[^\n]*\| ([0-9.e-]+) \|\n", report).group(1) for m in hv}
    assert len(set(shown.values())) == len(set(hv.values())), shown  # and prints differently
    best, second = sorted(hv.items(), key=lambda kv: -kv[1])[:2]
    gain = 100 * (best[1] - second[1]) / second[1]
    assert (f"By front hypervolume, {label(best[0])} wins with {best[1]:.4f}, {gain:.1f}% above the runner-up, "
            f"{label(second[0])} ({second[1]:.4f}).") in report
    assert "reference point lies 10% of the objective's range below its worst value" in report
    assert "## Per preference" in report and "## HM3 solutions" in report
    assert (out / "front.svg").exists()
    # floats are stored rounded: no float32 artefacts such as 0.699999988079071
    floats = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]
    assert floats and all(float(f"{x:.6g}") == x for x in floats)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lower = [r for r in records if r.get("stage") == "lower" and "iteration" in r]
    assert [r["iteration"] for r in lower] == list(range(1, 9))  # smoke: 8 PPO iterations, one record each
    assert all(len(r["reward"]) == len(r["best_reward"]) == 3 for r in lower)
    final = {r["stage"]: r for r in records if r.get("stage") in ("front", "heldout_scores")}
    assert final["front"]["step"] == 8 and final["front"]["hypervolume"] == hv
    assert len(final["heldout_scores"]["hm3"]) == 3


def test_a_stopped_run_resumes_from_its_stages_to_the_same_front(smoke_run, tmp_path):
    """The CLI's resume path: a copy of the finished run without its front files, stopped right after
    the upper level (exit 3, no front written), then run again, restores every stage from its
    checkpoint and writes the same front.json. (tests/test_killpoints.py sweeps a kill after every
    commit in-process; this checks the command line's own messages and exit codes.)"""
    import shutil

    out, zoo = smoke_run
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    for name in ("front.json", "front.png", "front.svg", "report.md"):
        (run / name).unlink()
    first = _train(run, zoo, stop_after="upper")
    assert "stopped after upper" in first.stderr
    assert not (run / "front.json").exists()
    second = _train(run, zoo)
    from hm3jax.run.stages import STAGES

    for stage in set(STAGES) - {"generated"}:  # generated: tasks.kind files only
        assert any(line.startswith(f"[{stage}]") and line.endswith("(from checkpoint)")
                   for line in second.stderr.splitlines()), (stage, second.stderr)
    assert json.loads((run / "front.json").read_text()) == json.loads((out / "front.json").read_text())


def test_recommend_exports_a_model_with_the_fronts_scores(smoke_run, tmp_path):
    import jax.numpy as jnp

    from hm3jax.io import load_pretrained
    from hm3jax.models import forward
    from hm3jax.objectives import make_suite_batch
    from hm3jax.zoo import load_zoo

    out, zoo = smoke_run
    dest = tmp_path / "model"
    res = subprocess.run([sys.executable, "-m", "hm3jax.recommend", str(out), "--preference", "0.6,0.2,0.2",
                          "--export", str(dest)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads((dest / "hm3jax_solution.json").read_text())
    cfg, params = load_pretrained(dest)
    assert cfg.num_hidden_layers == len(record["path"])
    _, _, tokenizer = load_zoo(zoo)
    batch = make_suite_batch(SMALL.suite(), "heldout", tokenizer)
    np.testing.assert_allclose(_heldout_exact_match(dest, zoo), record["scores"]["heldout"], atol=1e-6)
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    rows = slice(0, 16)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(batch.tokens[rows], dtype=torch.long),
                       attention_mask=torch.tensor(batch.attention_mask[rows], dtype=torch.long)).logits.numpy()
    mine = np.asarray(forward(cfg, params, jnp.asarray(batch.tokens[rows]), jnp.asarray(batch.attention_mask[rows])))
    real = batch.attention_mask[rows].astype(bool)
    assert np.abs(mine - theirs)[real].max() <= 1e-4


def _heldout_exact_match(model_dir, zoo) -> np.ndarray:
    """[K] held-out exact match of an exported checkpoint on the SMALL suite."""
    import jax.numpy as jnp

    from hm3jax.io import load_pretrained
    from hm3jax.models import forward
    from hm3jax.objectives import exact_match, make_suite_batch, task_means
    from hm3jax.zoo import load_zoo

    cfg, params = load_pretrained(model_dir)
    batch = make_suite_batch(SMALL.suite(), "heldout", load_zoo(zoo)[2])
    em = exact_match(forward(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)), batch)
    return np.asarray(task_means(em, batch, len(TASK_NAMES)))


def test_online_search_answers_a_new_preference_with_the_runs_agent(smoke_run, tmp_path):
    """recommend --search-iterations: the run's λ-conditioned agent continues on a preference the run
    never saw; the answer is exported like a front solution and the run directory is left as it was."""
    out, zoo = smoke_run
    before = {f: (out / f).read_bytes() for f in ("front.json", "metrics.jsonl", "config.yaml")}
    dest = tmp_path / "online"
    res = subprocess.run([sys.executable, "-m", "hm3jax.recommend", str(out), "--preference", "0.2,0.3,0.5",
                          "--search-iterations", "4", "--export", str(dest)], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "online search (4 iterations of the run's conditioned agent)" in res.stderr
    record = json.loads(res.stdout)
    np.testing.assert_allclose(record["preference"], [0.2, 0.3, 0.5], atol=1e-6)
    assert record["upper"]["method"] in ("task_arithmetic", "ties", "dare_ties")
    assert record["path"] and record["shell"] == "merge"
    assert json.loads((dest / "hm3jax_solution.json").read_text()) == record
    np.testing.assert_allclose(_heldout_exact_match(dest, zoo), record["scores"]["heldout"], atol=1e-6)
    assert {f: (out / f).read_bytes() for f in before} == before


@pytest.mark.parametrize("args,words", [
    (["--bogus.key", "1"], "bogus"),
    (["--preferences.extra", "[[0.5, 0.6, 0.1]]"], "off the simplex"),
    (["--preferences.extra", "[[0.5, 0.5]]"], "2 weights for 3 tasks"),
    (["--lower.ppo.iterations", "6"], "lower.ppo.iterations"),
    (["--lower.objective", "loglik"], "lower.objective"),
])
def test_config_errors_write_nothing(tmp_path, args, words):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "hm3jax.train", "--config_path", SMOKE, "--output_dir", str(out),
                          "--models.zoo.dir", str(tmp_path / "zoo"), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**os.environ, "HM3JAX_NO_HUGE_PAGES": "1"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in res.stderr and res.stderr.startswith("error: "), res.stderr
    assert os.listdir(tmp_path) == []


def test_run_directory_of_another_config_is_refused(smoke_run, tmp_path):
    out, zoo = smoke_run
    before = sorted(os.listdir(out))
    res = _train(out, zoo, "--upper.density", "0.5", check=False)
    assert res.returncode == 2 and "upper.density" in res.stderr and "config.yaml" in res.stderr, res.stderr
    assert sorted(os.listdir(out)) == before
