"""Generation-based scorers on hand-written samples."""

import math

import pytest

from hm3jax.objectives.realtasks import (
    chrf_corpus,
    chrf_sentence,
    code_pass_at_k,
    extract_last_number,
    extract_strict,
    gsm8k_accuracy,
    gsm8k_match,
    gsm8k_reference,
    pass_at_k,
    run_program,
)


def test_gsm8k_extraction_and_match():
    assert extract_last_number("She pays $1,234.50 in total.") == "1234.50"
    assert extract_last_number("3 apples and 4 pears make 7.") == "7"
    assert extract_last_number("It drops to -12 degrees") == "-12"
    assert extract_last_number("no digits here") is None
    assert extract_strict("so x = 5\n#### 1,200") == "1200"
    assert extract_strict("answer: 5") is None
    assert gsm8k_reference("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_reference("$72.") == "72"

    ref = "She has 3 + 4 = 7.\n#### 7"
    assert gsm8k_match("First 3, then 4 more, so the answer is 7.", ref)
    assert gsm8k_match("The answer is $7", "7")
    assert not gsm8k_match("7 apples, 8 pears", ref)          # the last number counts
    assert not gsm8k_match("The answer is 7.0", ref)          # string match, as in the harness
    assert gsm8k_match("blah\n#### 7", ref, mode="strict")
    assert not gsm8k_match("the answer is 7", ref, mode="strict")
    assert gsm8k_accuracy(["so 7", "so 8", "so 1,000"], ["7", "7", "#### 1000"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mode"):
        gsm8k_match("7", "7", mode="loose")
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        gsm8k_accuracy(["7", "8"], ["7"])


def test_chrf_by_hand():
    # hyp "ab" vs ref "abc": unigrams P = 2/2, R = 2/3; bigrams P = 1/1, R = 1/2; higher orders have
    # no hypothesis n-grams. Averages P = 1, R = 7/12; F_beta=2 = 5PR / (4P + R) = 7/11.
    assert chrf_sentence("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert chrf_sentence("the cat", ["a dog", "the cat"]) == pytest.approx(100.0)
    assert chrf_sentence("xyz", "abc") == 0.0
    # Corpus chrF pools the n-gram counts: "ab" / "abc" plus an exact "abc" / "abc".
    # Unigrams 5/5 and 5/6, bigrams 3/3 and 3/4, trigrams 1/1 and 1/2: P = 1, R = (5/6+3/4+1/2)/3.
    r = (5 / 6 + 3 / 4 + 1 / 2) / 3
    assert chrf_corpus(["ab", "abc"], ["abc", "abc"]) == pytest.approx(100 * 5 * r / (4 + r))
    assert chrf_corpus(["ab"], [["zz", "abc"]]) == pytest.approx(100 * 7 / 11)


def test_pass_at_k_estimator():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k failures: any k samples include a pass
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k(5, 1, 6)


ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_sandbox_statuses():
    assert run_program("def add(a, b):\n    return a + b", ADD_TESTS).status == "passed"
    wrong = run_program("def add(a, b):\n    return a - b", ADD_TESTS)
    assert (wrong.passed, wrong.status) == (False, "failed") and "AssertionError" in wrong.detail
    assert run_program("def add(a, b) return", ADD_TESTS).status == "failed"  # syntax error
    slow = run_program("while True:\n    pass", timeout_s=1.0)
    assert (slow.passed, slow.status) == (False, "timeout")
    hog = run_program("x = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert (hog.passed, hog.status) == (False, "memory")


def test_code_pass_at_k():
    good = "def add(a, b):\n    return a + b"
    bad = "def add(a, b):\n    return 0"
    samples = [[good, bad], [bad, bad]]
    tests = [ADD_TESTS, ADD_TESTS]
    out = code_pass_at_k(samples, tests, ks=(1, 2), max_workers=2)
    assert out == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    with pytest.raises(ValueError, match="fewer than k=3"):
        code_pass_at_k(samples, tests, ks=(3,))
