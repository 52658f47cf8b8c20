"""Real task files (tasks.kind files): JSONL records checked line by line, and the task scorers on
generated answers."""

import json

import pytest

from hm3jax.objectives.taskfiles import FileTask, TaskFileError, generated_score, read_task_file


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines,scorer,match", [
    (['{"prompt": "a", "answer": "b"}', "not json"], "gsm8k", r"line 2: not a JSON object"),
    (['["prompt", "answer"]'], "gsm8k", r"line 1: expected a JSON object, got list"),
    (['{"prompt": "a"}'], "chrf", r"line 1: needs a string 'answer'"),
    (['{"prompt": "a", "answer": 3}'], "chrf", r"line 1: needs a string 'answer'"),
    (['{"prompt": "a", "answer": "b"}'], "pass_at_k", r"line 1: needs a string 'test'"),
    (['{"prompt": "", "answer": "b"}'], "gsm8k", r"line 1: empty prompt"),
    (["", "  "], "gsm8k", r"no records"),
])
def test_bad_records_name_the_key_file_and_line(tmp_path, lines, scorer, match):
    path = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(TaskFileError, match=match) as e:
        read_task_file(path, scorer, "tasks.files.math.search")
    assert str(e.value).startswith(f"tasks.files.math.search: {path}")


def test_missing_or_binary_files_are_clear_errors(tmp_path):
    with pytest.raises(TaskFileError, match="no such file"):
        read_task_file(tmp_path / "nope.jsonl", "gsm8k", "tasks.files.math.heldout")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TaskFileError, match="cannot be read as UTF-8"):
        read_task_file(tmp_path / "bin.jsonl", "gsm8k", "tasks.files.math.heldout")


def test_file_task_gives_the_examples_of_each_split(tmp_path):
    recs = [{"prompt": f"p{i}", "answer": f"a{i}", "test": "pass"} for i in range(3)]
    s = _write(tmp_path / "s.jsonl", [json.dumps(r) for r in recs[:2]] + [""])
    h = _write(tmp_path / "h.jsonl", [json.dumps(recs[2])])
    task = FileTask("code", str(s), str(h), "pass_at_k")
    assert task.examples("search") == [("p0", "a0"), ("p1", "a1")]
    assert task.records("heldout") == [recs[2]]
    with pytest.raises(KeyError, match="search and heldout"):
        task.examples("train")
    with pytest.raises(TaskFileError, match="scorer 'bleu'"):
        FileTask("code", str(s), str(h), "bleu")


def test_generated_scores_by_scorer():
    math = [{"prompt": "q", "answer": "so 70 + 2 = 72\n#### 72"}, {"prompt": "q", "answer": "#### 1,000"}]
    assert generated_score("gsm8k", ["I think it is 72.", "#### 999"], math) == 0.5
    assert generated_score("gsm8k", ["The answer: $72", "it is 1000"], math) == 1.0
    tr = [{"prompt": "q", "answer": "der Hund schläft"}]
    assert generated_score("chrf", ["der Hund schläft"], tr) == pytest.approx(1.0)
    assert generated_score("chrf", ["die Katze"], tr) < 0.5
    code = [{"prompt": "def f():", "answer": "    return 1", "test": "assert f() == 1"}] * 2
    assert generated_score("pass_at_k", ["def f():\n    return 1", "def f():\n    return 2"], code) == 0.5


def test_graded_prompts_are_left_padded_and_answers_end_at_eos(tmp_path):
    import numpy as np

    from hm3jax.objectives.taskfiles import decode_answers, graded_prompts
    from hm3jax.objectives.tokenizer import build_tokenizer

    tok = build_tokenizer()
    recs = [{"prompt": "M 1+2=", "answer": "3"}, {"prompt": "M 10+20=", "answer": "30"}, {"prompt": "x", "answer": "y"}]
    path = _write(tmp_path / "h.jsonl", [json.dumps(r) for r in recs])
    task = FileTask("math", str(path), str(path), "gsm8k")
    got, tokens, mask = graded_prompts(task, tok, 2, pad_id=0)
    assert got == recs[:2] and (mask[:, -1] == 1).all()
    for row, m, r in zip(tokens, mask, got):
        ids = tok([r["prompt"]], add_special_tokens=True)["input_ids"][0]
        assert row[m == 1].tolist() == ids and (row[m == 0] == 0).all()
    eos = tok.eos_token_id
    out = np.asarray([tok("12", add_special_tokens=False)["input_ids"] + [eos, 5],
                      tok("70", add_special_tokens=False)["input_ids"] + [eos, eos]])
    assert decode_answers(tok, out, eos) == ["12", "70"]
