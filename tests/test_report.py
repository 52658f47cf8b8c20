"""hm3jax.report on hand-made solution lists: dominance, hypervolumes, the written files and the
"where HM3 does not win" paragraph."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from hm3jax.report import (
    FRONT_FILE,
    METHODS,
    PLOT_FILE,
    REPORT_FILE,
    SVG_FILE,
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


def staircase(points, r, top):
    """2-D hypervolume of `points` in the box [r, top] scaled to [0, 1]^2, by hand."""
    pts = sorted(((x - r[0]) / (top[0] - r[0]), (y - r[1]) / (top[1] - r[1])) for x, y in points)[::-1]
    area, y_done = 0.0, 0.0
    for x, y in pts:  # from the largest x: each point adds its strip above the ones before
        if y > y_done:
            area += x * (y - y_done)
            y_done = y
    return area


def test_dominance_and_hypervolume_on_a_known_case():
    front = build_front(["a", "b"], HM3, BASELINES, REFS)
    assert [s["dominated"] for s in front["solutions"]] == [False, False, False, True]
    assert [s["dominated"] for s in front["baselines"]["param_only"]] == [False, False]
    # every point lies in [0.05, 0.9] on both tasks: the reference is 10% of 0.85 below 0.05
    r, top = [-0.035, -0.035], [0.9, 0.9]
    assert front["reference_point"] == pytest.approx(r)
    assert front["hypervolume_box"]["ideal"] == top and front["hypervolume_box"]["left_out"] == []
    hv = front["hypervolume"]
    assert hv["hm3"] == pytest.approx(staircase([(0.8, 0.2), (0.5, 0.5), (0.2, 0.8)], r, top))
    assert hv["param_only"] == pytest.approx(staircase([(0.6, 0.3), (0.3, 0.6)], r, top))
    assert hv["arch_only"] == pytest.approx(staircase([(0.4, 0.2)], r, top))
    assert hv["dare_ties"] == pytest.approx(staircase([(0.9, 0.1)], r, top))
    assert hv["ties"] == pytest.approx(staircase([(0.3, 0.3)], r, top))
    assert front["undominated_by_hm3"] == {
        "baselines": {"ties": [], "dare_ties": [0], "param_only": [0, 1], "arch_only": []},
        "references": ["a", "b"]}
    assert front["references"]["base"]["dominated"] is True
    assert front["ideal"] == [0.9, 0.9]  # best expert score per task
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
    # relative costs -1 and -0.5: the cost reference is 10% of 0.5 below -1
    assert front["reference_point"] == pytest.approx([-0.035, -0.035, -1.05])
    assert len(front["objectives"]) == 3
    # arch_only's one point (0.4, 0.2, cost -1) in the normalised box
    expected = (0.435 / 0.935) * (0.235 / 0.935) * (0.05 / 0.55)
    assert front["hypervolume"]["arch_only"] == pytest.approx(expected)
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
    assert sorted(os.listdir(tmp_path / "run")) == sorted([FRONT_FILE, PLOT_FILE, SVG_FILE, REPORT_FILE])
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
    assert (tmp_path / "run" / SVG_FILE).read_text().lstrip().startswith("<?xml")
    write_front(tmp_path / "run", front)
    assert sorted(os.listdir(tmp_path / "run")) == sorted([FRONT_FILE, PLOT_FILE, SVG_FILE, REPORT_FILE])


def test_solution_record_is_plain_json_and_round_trips():
    import numpy as np

    from hm3jax.cost import SolutionCost
    from hm3jax.run.record import UNSCORED, Solution, UpperSettings

    sol = Solution(np.asarray([0.5, 0.5], np.float32), UpperSettings("ties", np.float32(0.7), 1, np.int64(3)),
                   [("merge", np.int64(1)), None], "merge", [0.1, 0.2], np.asarray([0.3, 0.4]),
                   SolutionCost(1, 10, 20.0))
    s = sol.to_json()
    assert json.loads(json.dumps(s)) == s
    assert list(s) == ["preference", "upper", "path", "shell", "scores", "cost", "dominated"]
    assert list(s["upper"]) == ["method", "density", "scale", "seed"] and list(s["scores"]) == ["search", "heldout"]
    assert s["path"] == [["merge", 1], None] and s["upper"]["seed"] == 3
    assert type(s["upper"]["seed"]) is int and type(s["upper"]["scale"]) is float and type(s["path"][0][1]) is int
    assert s["upper"]["density"] == float(np.float32(0.7)) and s["preference"] == [0.5, 0.5]
    assert s["cost"] == {"layers": 1, "parameters": 10, "flops_per_token": 20.0}
    assert Solution.from_json(s) == sol and Solution.from_json(json.loads(json.dumps(s))) == sol
    front = build_front(["a", "b"], [s], {})
    assert front["solutions"][0]["dominated"] is False
    # the optional keys: the merge's own key, alignment, generated scores (null when not generated)
    for extra in ({"aligned": True}, {"generated": (0.5, 0.25)}, {"generated": UNSCORED},
                  {"upper": UpperSettings("dare_ties", 0.5, 1.0, 0, key_data=np.asarray([1, 2], np.uint32))},
                  {"upper": None, "cost": None, "dominated": True}):
        other = dataclasses.replace(sol, **extra)
        rec = json.loads(json.dumps(other.to_json()))
        assert Solution.from_json(rec) == other
        assert json.dumps(Solution.from_json(rec).to_json()) == json.dumps(rec)  # same keys, same order
    assert dataclasses.replace(sol, aligned=True).to_json()["aligned"] is True and "aligned" not in s
    assert dataclasses.replace(sol, generated=UNSCORED).to_json()["scores"]["generated"] is None
    assert list(dataclasses.replace(sol, generated=(1, 2)).to_json()["scores"]) == ["search", "heldout", "generated"]
    assert dataclasses.replace(sol, upper=UpperSettings("ties", 1, 1, 0, key_data=[7, 9])).to_json()["upper"] == \
        {"method": "ties", "density": 1.0, "scale": 1.0, "seed": 0, "key_data": [7, 9]}
    with pytest.raises(ValueError, match="not a solution record"):
        Solution.from_json({"preference": [0.5, 0.5], "path": [["merge", 1]], "shell": "merge"})


def test_numpy_numbers_are_written_as_json(tmp_path):
    import numpy as np

    s = sol([0.5, 0.5])
    s["scores"]["heldout"] = np.asarray([0.5, 0.5], np.float32)
    s["cost"]["layers"] = np.int64(2)
    paths = write_front(tmp_path, build_front(["a", "b"], [s], {}))
    back = json.load(open(paths[FRONT_FILE]))
    assert back["solutions"][0]["scores"]["heldout"] == [0.5, 0.5]
    assert back["solutions"][0]["cost"]["layers"] == 2


def test_a_zero_score_still_adds_volume_and_constant_objectives_are_left_out():
    # every solution costs the same: the cost objective cannot separate them and is left out
    hm3 = [sol([0.0, 0.6]), sol([0.5, 0.0])]
    front = build_front(["a", "b"], hm3, {"ties": [sol([0.0, 0.3])]}, cost_objective=True)
    box = front["hypervolume_box"]
    assert box["left_out"] == ["-flops_per_token (relative)"] and box["objectives"] == ["a", "b"]
    assert front["reference_point"][:2] == pytest.approx([-0.05, -0.06])
    assert front["hypervolume"]["ties"] > 0  # 0 on task a, yet above the reference point
    assert front["hypervolume"]["hm3"] == pytest.approx(
        staircase([(0.0, 0.6), (0.5, 0.0)], [-0.05, -0.06], [0.5, 0.6]))
    assert "Left out of the volume (one value across all solutions): -flops_per_token" in report_markdown(front)


def test_winner_sentence_and_per_preference_table():
    from hm3jax.report_text import tchebycheff_rows, winner_sentence

    front = build_front(["a", "b"], HM3, BASELINES, REFS)
    hv = front["hypervolume"]
    second = sorted(hv.values())[-2]
    text = winner_sentence(front)
    assert text.startswith(f"By front hypervolume, HM3 full wins with {hv['hm3']:.4f}")
    assert f"{100 * (hv['hm3'] - second) / second:.1f}% above the runner-up, HM3 parameter level only" in text
    prefs, rows = tchebycheff_rows(front)
    assert prefs == [s["preference"] for s in HM3]
    table = dict(rows)
    # HM3's own solution for λ = (0.9, 0.1) is (0.8, 0.2): max(0.9 * 0.1, 0.1 * 0.7)
    assert table["HM3 full"][0] == pytest.approx(0.09)
    assert table["Expert: a"][0] == pytest.approx(0.1 * 0.85)
    assert set(table) == {"Base", "Expert: a", "Expert: b", "TIES", "DARE-TIES", "HM3 parameter level only",
                          "HM3 architecture level only", "HM3 full"}
    report = report_markdown(front)
    assert "## Per preference" in report and "| model | λ = (0.90, 0.10) |" in report
    assert "`m0 [math:1]`" in report


def test_path_text_is_readable():
    from hm3jax.report import path_text

    path = [["merge", 0], ["merge", 1], ["merge", 2], ["code", 3], None, ["merge", 5]]
    assert path_text(path) == "m0 m1 m2 [code:3] - m5"
    assert path_text([["base", 0], ["math", 1]]) == "[base:0] [math:1]"


def test_floats_are_stored_rounded(tmp_path):
    import numpy as np

    s = sol([0.5, 0.5])
    s["scores"]["heldout"] = [float(np.float32(0.7)), 0.5]
    s["upper"]["density"] = float(np.float32(0.7))
    paths = write_front(tmp_path, build_front(["a", "b"], [s], {}))
    text = open(paths[FRONT_FILE]).read()
    assert "0.699999988" not in text and "0.7" in text
    back = json.loads(text)
    assert back["solutions"][0]["scores"]["heldout"] == [0.7, 0.5]
    floats = []

    def walk(x):
        if isinstance(x, float):
            floats.append(x)
        elif isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, list):
            [walk(v) for v in x]

    walk(back)
    assert all(float(f"{x:.6g}") == x for x in floats)


def test_metrics_records_keep_their_timestamps_and_round_their_values(tmp_path):
    """metrics.jsonl: each record's time is the wall clock to the millisecond (not rounded to six
    significant digits, which would give every record of a day the same time), its float values
    are rounded for reading."""
    import time

    import numpy as np

    from hm3jax.run.store import metrics_logger

    write = metrics_logger(str(tmp_path), tensorboard=False)
    before = time.time()
    write({"stage": "lower", "iteration": 1, "reward": np.float32(0.7)})
    write({"stage": "lower", "iteration": 2, "reward": 0.123456789})
    after = time.time()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(before - 0.001 <= r["time"] <= after + 0.001 for r in records), records
    assert [r["reward"] for r in records] == [0.7, 0.123457]
