"""Real tasks from JSONL files (`tasks.kind: files`): reading, and scoring generated answers.

Each line of a task file is one JSON object:

    {"prompt": str, "answer": str}                  gsm8k, chrf
    {"prompt": str, "answer": str, "test": str}     pass_at_k

"answer" is the reference continuation of the prompt: the GSM8K solution ending in "#### <number>",
the reference translation, or a reference program. The search and the held-out table score it
teacher-forced, like the embedded suite (`tasks.objective`: all answer tokens right, or their mean
log-likelihood), because a path search scores thousands of candidates. The task's `scorer` then
grades what a model *generates* for the held-out prompts (`generated_score`): GSM8K answer match,
chrF / 100, or pass@1 of the generated program run with "test" in the code sandbox.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from hm3jax.io.paths import NotRegularFileError, open_regular
from hm3jax.objectives import realtasks
from hm3jax.settings import SCORERS as TASK_FILE_SCORERS


class TaskFileError(ValueError):
    """A task file that cannot be read as this module's JSONL (the message names file and line)."""


def read_task_file(path: str | os.PathLike, scorer: str, where: str) -> list[dict]:
    """The records of one JSONL task file, checked: each has string "prompt" and "answer" (and
    "test" for pass_at_k); blank lines are skipped. `where` names the config key in errors."""
    path = os.fspath(path)
    try:
        with open_regular(path, "r", what="task file", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise TaskFileError(f"{where}: {path}: no such file") from None
    except NotRegularFileError as e:
        raise TaskFileError(f"{where}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{where}: {path}: cannot be read as UTF-8 text ({e})") from None
    keys = ("prompt", "answer", "test") if scorer == "pass_at_k" else ("prompt", "answer")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: {path} line {n}: not a JSON object ({e.msg})") from None
        except RecursionError:
            raise TaskFileError(f"{where}: {path} line {n}: nested too deeply to be a task record") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise TaskFileError(f"{where}: {path} line {n}: not a JSON object ({e})") from None
        if not isinstance(rec, dict):
            raise TaskFileError(f"{where}: {path} line {n}: expected a JSON object, got {type(rec).__name__}")
        for k in keys:
            if not isinstance(rec.get(k), str):
                raise TaskFileError(f"{where}: {path} line {n}: needs a string {k!r} "
                                    f"(keys for scorer {scorer}: {', '.join(keys)})")
            try:  # JSON's \ud800 escapes give lone surrogates, which no tokenizer or file can hold
                rec[k].encode("utf-8")
            except UnicodeEncodeError as e:
                raise TaskFileError(f"{where}: {path} line {n}: {k!r} holds a lone surrogate "
                                    f"(\\u{ord(rec[k][e.start]):04x} at character {e.start}), not Unicode text") from None
        if not rec["prompt"]:
            raise TaskFileError(f"{where}: {path} line {n}: empty prompt")
        out.append(rec)
    if not out:
        raise TaskFileError(f"{where}: {path}: no records (one JSON object per line)")
    return out


class FileTask:
    """A task read from its JSONL files: `.examples(split)` gives (prompt, answer) pairs like the
    embedded suite's tasks, `.records(split)` the whole records (with "test")."""

    def __init__(self, name: str, search: str, heldout: str, scorer: str):
        if scorer not in TASK_FILE_SCORERS:
            raise TaskFileError(f"tasks.files.{name}.scorer {scorer!r}: expected one of "
                                f"{', '.join(TASK_FILE_SCORERS)}")
        self.name, self.scorer = name, scorer
        self._records = {split: read_task_file(p, scorer, f"tasks.files.{name}.{split}")
                         for split, p in (("search", search), ("heldout", heldout))}

    def records(self, split: str) -> list[dict]:
        if split not in self._records:
            raise KeyError(f"task {self.name!r} has splits search and heldout, not {split!r}")
        return self._records[split]

    def examples(self, split: str) -> list[tuple[str, str]]:
        return [(r["prompt"], r["answer"]) for r in self.records(split)]


def graded_prompts(task: FileTask, tokenizer, rows: int, pad_id: int):
    """The task's first `rows` held-out records and their prompts as a left-padded batch (every row
    ends in its last prompt token, as generation needs): (records, tokens int32 [B, P], mask [B, P])."""
    recs = task.records("heldout")[:rows]
    ids = tokenizer([r["prompt"] for r in recs], add_special_tokens=True)["input_ids"]
    width = max(len(x) for x in ids)
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for i, x in enumerate(ids):
        tokens[i, width - len(x):], mask[i, width - len(x):] = x, 1
    return recs, tokens, mask


def decode_answers(tokenizer, generated, eos_id: int) -> list[str]:
    """Text of each row of generated tokens [B, N], up to (without) its first EOS."""
    rows = []
    for row in generated.tolist():
        rows.append(tokenizer.decode(row[:row.index(eos_id)] if eos_id in row else row, skip_special_tokens=True))
    return rows


def generated_score(scorer: str, texts: Sequence[str], records: Sequence[dict], timeout_s: float = 5.0) -> float:
    """Score in [0, 1] of generated `texts` for `records` (one per record) by the task's scorer."""
    answers = [r["answer"] for r in records]
    if scorer == "gsm8k":
        return realtasks.gsm8k_accuracy(texts, answers)
    if scorer == "chrf":
        return realtasks.chrf_corpus(texts, answers) / 100.0
    if scorer == "pass_at_k":
        return realtasks.code_pass_at_k([[t] for t in texts], [r["test"] for r in records], ks=(1,),
                                        timeout_s=timeout_s)[1]
    raise TaskFileError(f"scorer {scorer!r}: expected one of {', '.join(TASK_FILE_SCORERS)}")
