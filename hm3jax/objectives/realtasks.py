"""Generation-based scorers for real benchmarks: GSM8K answer match, chrF, and code pass@k.

These score decoded text (the search on real models uses them on generated continuations):
  - GSM8K: lm-evaluation-harness's "flexible-extract" (the last number in the text) and
    "strict-match" ("#### <number>"), both compared as strings after removing commas, "$" and a
    trailing ".".
  - chrF: sacrebleu's CHRF (character 6-grams, beta = 2), per corpus and per sentence.
  - pass@k: each program runs with its tests in a separate Python process (see run_program); the
    unbiased estimator of Chen et al. (2021) turns n samples with c passing into pass@k.

The code sandbox (run_program) lives in sandbox.py, with what it does and does not isolate.
"""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Sequence

import numpy as np

from hm3jax.objectives.sandbox import ExecResult, run_program

__all__ = [
    "ExecResult", "chrf_corpus", "chrf_sentence", "code_pass_at_k", "extract_last_number", "extract_strict",
    "gsm8k_accuracy", "gsm8k_match", "gsm8k_reference", "normalize_number", "pass_at_k", "run_program",
]

# --- GSM8K -----------------------------------------------------------------------------------------

# The harness's patterns: flexible takes the last match of either alternative.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_REFERENCE = re.compile(r"(?s).*####\s*")


def normalize_number(text: str) -> str:
    """Drop commas and "$", surrounding space and one trailing "." ("$1,234." -> "1234")."""
    s = text.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (harness flexible-extract), normalised; None when there is none."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return None
    first, second = matches[-1]
    return normalize_number(first or second)


def extract_strict(text: str) -> str | None:
    """The number after the first "#### " (harness strict-match), normalised; None when absent."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K reference: the text after "####" if present, normalised."""
    return normalize_number(_REFERENCE.sub("", answer))


def gsm8k_match(prediction: str, reference: str, mode: str = "flexible") -> bool:
    """Whether a generated solution's final number equals the reference answer.

    Args:
      prediction: generated text.
      reference: a GSM8K answer (full solution ending "#### 72", or just "72").
      mode: "flexible" (last number in the text) or "strict" (the "#### " line).
    """
    if mode not in ("flexible", "strict"):
        raise ValueError(f"gsm8k_match: mode must be 'flexible' or 'strict', got {mode!r}")
    got = extract_last_number(prediction) if mode == "flexible" else extract_strict(prediction)
    return got is not None and got == gsm8k_reference(reference)


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str], mode: str = "flexible") -> float:
    """Fraction of predictions matching their references (0..1)."""
    _same_length("gsm8k_accuracy", predictions, references)
    return float(np.mean([gsm8k_match(p, r, mode) for p, r in zip(predictions, references)]))


# --- chrF ------------------------------------------------------------------------------------------

def _same_length(where: str, a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{where}: {len(a)} hypotheses but {len(b)} references; need one per hypothesis")
    if len(a) == 0:
        raise ValueError(f"{where}: no hypotheses given")


def _chrf():
    # sacrebleu loads only for chrF scoring
    from sacrebleu.metrics import CHRF  # imported on use: only translation scoring needs it

    return CHRF()


def chrf_corpus(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus-level chrF (0..100): n-gram statistics summed over all sentences, then one F-score.

    Args:
      hypotheses: N system outputs.
      references: N reference strings, or N lists of reference strings (the same count each).
    """
    _same_length("chrf_corpus", hypotheses, references)
    if isinstance(references[0], str):
        ref_streams = [list(references)]
    else:
        # sacrebleu wants one stream per reference position: streams[j][i] = j-th reference of i.
        ref_streams = [list(r) for r in zip(*references)]
    return float(_chrf().corpus_score(list(hypotheses), ref_streams).score)


def chrf_sentence(hypothesis: str, references: str | Sequence[str]) -> float:
    """Sentence-level chrF (0..100) of one hypothesis against one or more references."""
    refs = [references] if isinstance(references, str) else list(references)
    return float(_chrf().sentence_score(hypothesis, refs).score)


# --- code: sandboxed execution and pass@k -----------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 - C(n - c, k) / C(n, k), the chance that k of n samples include a pass.

    Args:
      n: samples generated; c: how many passed (0 <= c <= n); k: 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids the huge binomials of the direct formula.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def code_pass_at_k(
    samples: Sequence[Sequence[str]],
    tests: Sequence[str],
    ks: Sequence[int] = (1,),
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_workers: int = 1,
) -> dict[int, float]:
    """Mean pass@k over problems, running every sample against its problem's tests.

    Args:
      samples: per problem, n generated programs (n may differ between problems; each n >= max(ks)).
      tests: per problem, test source appended to each of its programs.
      ks: the k values to report.
      timeout_s, memory_mb: per-run limits (see run_program).
      max_workers: processes run at once.

    Returns:
      {k: mean pass@k over problems} with values in 0..1.
    """
    _same_length("code_pass_at_k", samples, tests)
    jobs = [(i, prog) for i, progs in enumerate(samples) for prog in progs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        results = list(pool.map(lambda job: run_program(job[1], tests[job[0]], timeout_s, memory_mb), jobs))
    correct = np.zeros(len(samples), int)
    for (i, _), res in zip(jobs, results):
        correct[i] += res.passed
    out = {}
    for k in ks:
        short = [i for i, progs in enumerate(samples) if len(progs) < k]
        if short:
            raise ValueError(f"code_pass_at_k: problems {short} have fewer than k={k} samples")
        out[int(k)] = float(np.mean([pass_at_k(len(p), int(c), k) for p, c in zip(samples, correct)]))
    return out
