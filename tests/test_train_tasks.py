"""python -m hm3jax.train with real task files (tasks.kind files) and alignment maps at model
switches (lower.align), on the session's SMALL zoo with its own suite written out as JSONL."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.zoo import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")

pytestmark = pytest.mark.slow


def _files_config(tmp_path, zoo, bad_line=None) -> str:
    """A copy of smoke.yaml whose tasks are JSONL files written from the SMALL suite (math scored
    by GSM8K answer match, code and translation by chrF); bad_line replaces math's 3rd search line."""
    import yaml

    files = {}
    for task, scorer in zip(SMALL.suite(), ("gsm8k", "chrf", "chrf")):
        paths = {}
        for split in ("search", "heldout"):
            lines = [json.dumps({"prompt": p, "answer": a}) for p, a in task.examples(split)]
            if bad_line is not None and task.name == "math" and split == "search":
                lines[2] = bad_line
            paths[split] = tmp_path / f"{task.name}-{split}.jsonl"
            paths[split].write_text("\n".join(lines) + "\n")
        files[task.name] = {"search": str(paths["search"]), "heldout": str(paths["heldout"]), "scorer": scorer}
    with open(SMOKE) as f:
        cfg = yaml.safe_load(f)
    cfg["tasks"] = {"kind": "files", "objective": "exact_match", "files": files, "max_new_tokens": 12,
                    "generate_rows": 16}
    cfg["models"]["zoo"]["dir"] = str(zoo)
    path = tmp_path / "files.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _train(config, out, *extra):
    return subprocess.run([sys.executable, "-m", "hm3jax.train", "--config_path", config, "--output_dir", str(out),
                           *extra], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "HM3JAX_NO_HUGE_PAGES": "1"})


def test_task_files_and_alignment_run(small_zoo, small_zoo_loaded, tmp_path):
    """One run with tasks from JSONL files and lower.align on:
    - the files give the embedded suite's teacher-forced held-out scores for the base and experts;
    - each task's scorer grades greedy answers (a math answer right token by token is matched);
    - the maps are fitted once before the search (the gap shrinks); solutions whose path switches
      models are marked aligned and get no generated grade (generation runs without maps);
    - held-out scoring after a restart uses the maps saved with the search: the same front."""
    from hm3jax.models import forward
    from hm3jax.objectives import exact_match, make_batch, make_suite_batch
    from hm3jax.objectives.scoring import make_params_scorer
    from hm3jax.run.solutions import switches_models

    cfg_path, run = _files_config(tmp_path, small_zoo[0]), tmp_path / "run"
    args = ("--lower.align.enabled", "true", "--lower.align.steps", "20", "--eval.baselines", "false")
    res = _train(cfg_path, run, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[generated] task scorers on generated held-out answers" in res.stderr
    front = json.loads((run / "front.json").read_text())
    tasks = front["tasks"]
    assert tasks == ["math", "code", "translation"]  # the order of tasks.files

    cfg, models, tok = small_zoo_loaded
    held = make_suite_batch(SMALL.suite(), "heldout", tok)
    score = make_params_scorer(cfg, held, len(tasks))
    for name, rec in front["references"].items():
        np.testing.assert_allclose(rec["scores"]["heldout"], np.asarray(score(models[name])), atol=1e-6)
        assert len(rec["scores"]["generated"]) == 3 and all(0 <= x <= 1 for x in rec["scores"]["generated"])
    rows = SMALL.suite()[0].examples("heldout")[:16]
    b = make_batch(rows, tok)
    em = exact_match(forward(cfg, models["math"], jnp.asarray(b.tokens), jnp.asarray(b.attention_mask)), b)
    assert front["references"]["math"]["scores"]["generated"][0] >= float(np.mean(em)) - 1e-6
    assert "## Generated answers" in (run / "report.md").read_text()

    assert "[align] switch statistics gap" in res.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fit = [r for r in records if r.get("stage") == "align"]
    assert len(fit) == 1 and fit[0]["gap_after"] < fit[0]["gap_before"], fit
    for sol in front["solutions"]:
        aligned = switches_models(sol["path"], sol["shell"])
        assert sol.get("aligned", False) == aligned, sol
        assert (sol["scores"]["generated"] is None) == aligned, sol
    for sol in front["baselines"]["param_only"]:
        assert "aligned" not in sol  # no path search, no maps

    shutil.rmtree(run / "checkpoints" / "stages" / "heldout")
    shutil.rmtree(run / "checkpoints" / "stages" / "generated")
    (run / "front.json").unlink()
    again = _train(cfg_path, run, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[align]" not in again.stderr and "[lower]" in again.stderr and "from checkpoint" in again.stderr
    assert json.loads((run / "front.json").read_text()) == front


def test_a_bad_task_file_is_an_error_naming_file_and_line(small_zoo, tmp_path):
    out = tmp_path / "run"
    res = _train(_files_config(tmp_path, small_zoo[0], bad_line='{"prompt": "M 1+2="}'), out)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "tasks.files.math.search" in res.stderr and "math-search.jsonl line 3" in res.stderr, res.stderr
    assert "'answer'" in res.stderr and not out.exists()
    # answers longer than the model can hold are refused before any search
    res = _train(_files_config(tmp_path, small_zoo[0]), out, "--tasks.max_new_tokens", "100000")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "tasks.max_new_tokens 100000" in res.stderr and "max_position_embeddings" in res.stderr, res.stderr
    assert not (out / "checkpoints" / "stages").exists()
