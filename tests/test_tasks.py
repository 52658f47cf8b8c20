"""The embedded task suite and its character-level tokenizer."""

import json

import pytest

from hm3jax.objectives import synthetic
from hm3jax.objectives.synthetic import LEXICON, MAX_EXAMPLE_CHARS, TASK_NAMES, Task, tasks
from hm3jax.objectives.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    build_tokenizer,
    save_tokenizer,
)

N_EVAL, N_TRAIN = 200, 300


@pytest.fixture(scope="module")
def suite():
    return tasks(seed=0, n_eval=N_EVAL, n_train=N_TRAIN)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _all(task):
    return {split: task.examples(split) for split in ("search", "heldout", "train")}


def test_suite_order_and_markers(suite):
    assert tuple(t.name for t in suite) == TASK_NAMES == ("math", "code", "translation")
    assert len({t.marker for t in suite}) == 3
    for t in suite:
        for ex in _all(t).values():
            for prompt, answer in ex:
                assert prompt.startswith(t.marker) and prompt.endswith("="), (t.name, prompt)
                assert answer and "=" not in answer
                assert len(prompt) + len(answer) <= MAX_EXAMPLE_CHARS, (prompt, answer)


def test_deterministic_per_seed():
    synthetic._unique_examples.cache_clear()
    first = [t.examples("search") for t in tasks(seed=3, n_eval=50, n_train=10)]
    synthetic._unique_examples.cache_clear()
    again = [t.examples("search") for t in tasks(seed=3, n_eval=50, n_train=10)]
    other = [t.examples("search") for t in tasks(seed=4, n_eval=50, n_train=10)]
    assert first == again
    assert all(a != b for a, b in zip(first, other))


def test_splits_sized_disjoint_and_stable(suite):
    for t in suite:
        ex = _all(t)
        assert len(ex["search"]) == 140 and len(ex["heldout"]) == 60 and len(ex["train"]) == N_TRAIN
        prompts = [set(p for p, _ in e) for e in ex.values()]
        assert sum(map(len, prompts)) == len(set.union(*prompts)), "splits overlap or repeat"
        # The evaluation splits do not depend on the size of the training split.
        smaller = Task(t.name, seed=0, n_eval=N_EVAL, n_train=5)
        assert smaller.examples("search") == ex["search"]
        assert smaller.examples("heldout") == ex["heldout"]
    with pytest.raises(ValueError, match="unknown split"):
        suite[0].examples("test")
    with pytest.raises(ValueError, match="unknown task name"):
        Task("poetry")


def test_answers_are_correct(suite):
    math, code, translation = suite
    for prompt, answer in math.examples("search"):
        a, op, b = _split_arith(prompt[2:-1])
        assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op], prompt
    ops = {"rev": lambda x: x[::-1], "sort": sorted, "sum": lambda x: [sum(x)],
           "max": lambda x: [max(x)], "min": lambda x: [min(x)], "inc": lambda x: [(v + 1) % 10 for v in x]}
    seen_ops = set()
    for prompt, answer in code.examples("search"):
        op, rest = prompt[2:-1].split(" ", 1)
        xs = [int(v) for v in rest.strip("[]").split()]
        seen_ops.add(op)
        assert [int(v) for v in answer.split()] == list(ops[op](xs)), prompt
    assert seen_ops == set(ops)
    nouns = {"cat", "dog", "fox", "owl", "cow", "pig", "rat", "bee", "ant", "elk"}

    def flip(phrase):  # target order: noun, then its adjective
        return [LEXICON[w] for w in reversed(phrase)]

    for prompt, answer in translation.examples("search"):
        words = prompt[2:-1].split()
        verb_at = next(i for i, w in enumerate(words) if i > 0 and words[i - 1] in nouns)
        subj, verb, obj = words[:verb_at], words[verb_at], words[verb_at + 1:]
        assert answer.split() == flip(subj) + flip(obj) + [LEXICON[verb]], prompt
    # The example in the module docstring.
    assert " ".join(flip(["big", "cat"]) + flip(["dog"]) + [LEXICON["saw"]]) == "ka gu mo bi"


def _split_arith(body):
    # The first operand is never negative, so the operator is the first non-digit character.
    i = next(i for i, c in enumerate(body) if not c.isdigit())
    return int(body[:i]), body[i], int(body[i + 1:])


def test_tokenizer_roundtrip_and_coverage(suite, tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    texts = [s for t in suite for p, a in t.examples("search") for s in (p, a, p + a)]
    texts += ["  two  spaces . , ' ? ~", ""]
    encoded = tokenizer(texts)["input_ids"]
    for text, ids in zip(texts, encoded):
        assert ids[0] == BOS_ID and len(ids) == len(text) + 1
        assert UNK_ID not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("a\u00e9", add_special_tokens=False)["input_ids"][1] == UNK_ID


def test_saved_tokenizer_loads_with_transformers(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "C sort [3 1 4]=1 3 4"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)


def test_every_task_has_an_easy_and_a_hard_half(suite):
    hard = [synthetic.is_hard(name, p) for name, p in [
        ("math", "M 12+99="), ("math", "M 100+5="), ("code", "C max [1 2]="), ("code", "C sort [2 1]="),
        ("translation", "T cat saw dog="), ("translation", "T cat saw big dog=")]]
    assert hard == [False, True, False, True, False, True]
    for t in suite:
        ex = t.examples("search") + t.examples("heldout")
        share = sum(synthetic.is_hard(t.name, p) for p, _ in ex) / len(ex)
        assert 0.35 < share < 0.65, (t.name, share)
        if t.name == "math":  # the halves are what they say: two-digit vs three-digit operands
            for p, _ in ex:
                a, b = map(int, p[2:-1].split("+"))
                assert (a >= 100 and b >= 100) == synthetic.is_hard("math", p) == (a >= 100 or b >= 100)
    with pytest.raises(ValueError, match="unknown task name"):
        synthetic.is_hard("poetry", "P x=")
