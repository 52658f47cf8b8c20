"""hm3jax.report on hand-made solution lists: dominance, hypervolumes, the written files and the
"where HM3 does not win" paragraph."""

from __future__ import annotations

import json
import os

import pytest

from hm3jax.report import (
    FRONT_FILE,
    METHODS,
    PLOT_FILE,
    REPORT_FILE,
    build_front,
    report_markdown,
    where_hm3_does_not_win,
    write_front,
)


def sol(scores, pref=None, flops=100.0, method="dare_ties"):
    k = len(scores)
    return {"preference": pref if pref is not None else [1.0 / k] * k,
            "upper": {"method": method, "density": 0.7, "scale": 1.0, "seed": 0},
            "path": [["merge", 0], ["math", 1]], "shell": "merge",
            "scores": {"search": list(scores), "heldout": list(scores)},
            "cost": {"layers": 2, "parameters": 1000, "flops_per_token": flops}, "dominated": False}


HM3 = [sol([0.8, 0.2], [0.9, 0.1]), sol([0.5, 0.5], [0.5, 0.5]), sol([0.2, 0.8], [0.1, 0.9]),
       sol([0.4, 0.4], [0.6, 0.4], flops=50.0)]
BASELINES = {
    "ties": [sol([0.3, 0.3])],
    "dare_ties": [sol([0.9, 0.1])],
    "param_only": [sol([0.6, 0.3], [0.7, 0.3]), sol([0.3, 0.6], [0.3, 0.7])],
    "arch_only": [sol([0.4, 0.2])],
}
REFS = {"base": sol([0.1, 0.1]), "a": sol([0.9, 0.05]), "b": sol([0.05, 0.9])}


def test_dominance_and_hypervolume_on_a_known_case():
    front = build_front(["a", "b"], HM3, BASELINES, REFS)
    assert [s["dominated"] for s in front["solutions"]] == [False, False, False, True]
    assert [s["dominated"] for s in front["baselines"]["param_only"]] == [False, False]
    # staircases above (0, 0): 0.8*0.2 + 0.5*0.3 + 0.2*0.3, 0.6*0.3 + 0.3*0.3, 0.4*0.2, 0.9*0.1
    hv = front["hypervolume"]
    assert hv["hm3"] == pytest.approx(0.37)
    assert hv["param_only"] == pytest.approx(0.27)
    assert hv["arch_only"] == pytest.approx(0.08)
    assert hv["dare_ties"] == pytest.approx(0.09)
    assert hv["ties"] == pytest.approx(0.09)
    assert front["undominated_by_hm3"] == {
        "baselines": {"ties": [], "dare_ties": [0], "param_only": [0, 1], "arch_only": []},
        "references": ["a", "b"]}
    assert front["references"]["base"]["dominated"] is True
    assert front["ideal"] == [0.9, 0.9]  # best expert score per task
    assert front["reference_point"] == [0.0, 0.0]
    text = where_hm3_does_not_win(front)
    assert "1 of 1 DARE-TIES solutions are not dominated" in text
    assert "the a expert" in text and "TIES solutions" not in text.replace("DARE-TIES", "")
    assert "does not win" in text and "order full > parameter-only > architecture-only holds" in text


def test_everything_dominated_says_so():
    front = build_front(["a", "b"], HM3, {"ties": [sol([0.3, 0.3])], "arch_only": [sol([0.4, 0.2])],
                                          "param_only": [sol([0.45, 0.45])]}, {"base": sol([0.1, 0.1])})
    text = where_hm3_does_not_win(front)
    assert text.startswith("Every baseline solution and reference model is dominated")
    assert "holds" in text


def test_hypervolume_order_failure_is_reported():
    front = build_front(["a", "b"], [sol([0.3, 0.3])], {"param_only": [sol([0.5, 0.5])],
                                                        "arch_only": [sol([0.2, 0.2])]})
    text = where_hm3_does_not_win(front)
    assert "does NOT hold" in text and "below that of HM3 parameter level only" in text


def test_cost_objective_keeps_the_cheap_solution():
    front = build_front(["a", "b"], HM3, BASELINES, REFS, cost_objective=True)
    # (0.4, 0.4) is beaten on scores by (0.5, 0.5) but costs half
    assert [s["dominated"] for s in front["solutions"]] == [False, False, False, False]
    assert front["reference_point"] == [0.0, 0.0, -1.1]
    assert len(front["objectives"]) == 3
    # each point adds its score volume x (cost reference - its relative cost): 0.1 for cost 1, 0.6 for 0.5
    assert front["hypervolume"]["arch_only"] == pytest.approx(0.4 * 0.2 * 0.1)
    bad = [dict(HM3[0], cost={})]
    with pytest.raises(ValueError, match="flops_per_token"):
        build_front(["a", "b"], bad, {}, cost_objective=True)


def test_malformed_scores_are_named():
    with pytest.raises(ValueError, match=r"ties\[0\]: scores.heldout has 3 values for 2 tasks"):
        build_front(["a", "b"], HM3, {"ties": [sol([0.1, 0.2, 0.3])]})


def test_files_exist_and_parse(tmp_path):
    tasks = ["math", "code", "translation"]
    hm3 = [sol([0.7, 0.5, 0.4], [0.6, 0.2, 0.2]), sol([0.5, 0.6, 0.5], [0.3, 0.4, 0.3]),
           sol([0.4, 0.4, 0.7], [0.2, 0.2, 0.6])]
    baselines = {m: [sol([0.3, 0.3, 0.3], [1 / 3] * 3), sol([0.2, 0.5, 0.1], [0.1, 0.8, 0.1])]
                 for m in METHODS}
    baselines["dare_ties"].append(sol([0.9, 0.1, 0.1], [0.8, 0.1, 0.1]))
    refs = {"base": sol([0.1, 0.1, 0.1]), "math": sol([0.9, 0.1, 0.1]), "code": sol([0.1, 0.9, 0.1]),
            "translation": sol([0.1, 0.1, 0.9])}
    front = build_front(tasks, hm3, baselines, refs)
    paths = write_front(tmp_path / "run", front)
    assert sorted(os.listdir(tmp_path / "run")) == sorted([FRONT_FILE, PLOT_FILE, REPORT_FILE])
    back = json.load(open(paths[FRONT_FILE]))
    assert back["tasks"] == tasks and len(back["solutions"]) == 3
    assert set(back["hypervolume"]) == {"hm3", *METHODS}
    assert all(isinstance(s["dominated"], bool) for g in back["baselines"].values() for s in g)
    with open(paths[PLOT_FILE], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(paths[REPORT_FILE]).read()
    assert report == report_markdown(back)
    for label in ["Base", "Expert: math", "Expert: code", "Expert: translation", "Task Arithmetic", "TIES",
                  "DARE-TIES", "Random path search", "Evolutionary path search", "HM3 parameter level only",
                  "HM3 architecture level only", "HM3 full"]:
        assert f"| {label} |" in report
    assert "| model | math | code | translation | front HV |" in report
    # the centre-preference row of TIES is its [1/3, 1/3, 1/3] solution
    assert "| TIES | 30.0 | 30.0 | 30.0 |" in report
    assert "## Where HM3 does not win" in report and "DARE-TIES solutions are not dominated" in report
    # rewriting replaces the files in place, leaving no temporary siblings
    write_front(tmp_path / "run", front)
    assert sorted(os.listdir(tmp_path / "run")) == sorted([FRONT_FILE, PLOT_FILE, REPORT_FILE])


def test_make_solution_is_plain_json():
    from hm3jax.report import make_solution

    s = make_solution([0.5, 0.5], {"method": "ties", "density": 0.7, "scale": 1, "seed": 3},
                      [("merge", 1), None], "merge", [0.1, 0.2], [0.3, 0.4],
                      {"layers": 1, "parameters": 10, "flops_per_token": 20.0})
    assert json.loads(json.dumps(s)) == s
    assert set(s) == {"preference", "upper", "path", "shell", "scores", "cost", "dominated"}
    assert s["path"] == [["merge", 1], None] and s["upper"]["seed"] == 3
    front = build_front(["a", "b"], [s], {})
    assert front["solutions"][0]["dominated"] is False


def test_numpy_numbers_are_written_as_json(tmp_path):
    import numpy as np

    s = sol([0.5, 0.5])
    s["scores"]["heldout"] = np.asarray([0.5, 0.5], np.float32)
    s["cost"]["layers"] = np.int64(2)
    paths = write_front(tmp_path, build_front(["a", "b"], [s], {}))
    back = json.load(open(paths[FRONT_FILE]))
    assert back["solutions"][0]["scores"]["heldout"] == [0.5, 0.5]
    assert back["solutions"][0]["cost"]["layers"] == 2
