"""The embedded task suite: three generated tasks standing in for math, code and translation.

Each task draws unique (prompt, answer) string pairs from a seeded generator. The prompt starts with a
one-letter task marker ("M", "C", "T") so one model can tell the tasks apart, and ends with "=";
the answer follows directly. Every example fits in MAX_EXAMPLE_CHARS characters (prompt + answer) so
a tiny character-level model can learn it.

    math         "M 12+45="             -> "57"         (addition: two 2-digit or two 3-digit numbers)
    code         "C rev [3 1 4]="       -> "4 1 3"      (rev, sort, sum, max, min, inc on 2-4 digits)
    translation  "T big cat saw dog="   -> "ka gu mo bi" (fixed lexicon; SVO -> SOV, adjective after noun)

Each task has an easy half and a hard half (`is_hard`): numbers below 100 vs three-digit numbers;
the per-element list programs (max, min, inc) vs those that reorder or combine the whole list (rev,
sort, sum); sentences without vs with an adjective (whose translation follows its noun). The
embedded zoo "pretrains" its base on the easy halves (and, for code and translation, on hard rows
whose answers are mostly near misses), so the base has partial skill on every task and each expert
adds the hard half of its task: the skill a merge has to carry over.

Splits: the first `n_eval` unique examples are the evaluation set, cut 70/30 into "search" (scored
during the path search) and "heldout" (reported only). A further `n_train` unique examples, disjoint
from both, form the "train" split used to fine-tune the embedded experts. The evaluation examples are
drawn first, so changing `n_train` never changes "search" or "heldout".
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import numpy as np

SPLITS = ("search", "heldout", "train")
MAX_EXAMPLE_CHARS = 32
# Rejection sampling of unique examples gives up after this many draws per requested example; the
# generators below have spaces far larger than the default sizes, so hitting it means a config asks
# for more unique examples than the task can produce.
_MAX_DRAWS_PER_EXAMPLE = 50

Example = tuple[str, str]
Sampler = Callable[[np.random.Generator], Example]


# --- math: multi-digit arithmetic ------------------------------------------------------------------

def _number(rng: np.random.Generator, max_digits: int) -> int:
    # Digit count first, then the value, so short and long numbers are equally common.
    digits = int(rng.integers(1, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


# The drawn operators. "-" and "*" (2 x 1 digits) are implemented but left out of the mix: within
# their CPU time budget the embedded zoo's tiny experts plateau at ~0.3 exact match on "*" and, with
# "-" in the mix, at 0.3-0.9 depending on the seed; on "+" alone they pass 0.95.
_MATH_OPS = ("+",)
# Half the "+" and "-" prompts take two operands uniform on [0, 100) (the easy half), half two
# three-digit operands uniform on [100, 1000) (the hard half: one more column and carry). Uniform
# values within a half, not digit count first: with digit count first, the few 1-digit-op-1-digit
# prompts are used up by the evaluation splits, so "heldout" would lean on cases "train" hardly has.
_EASY_LIMIT = 100
_HARD_LIMIT = 1000


def _sample_math(rng: np.random.Generator) -> Example:
    # Indexing tuples with rng.integers is ~10x faster than rng.choice on lists, which matters when
    # thousands of examples are drawn at import of a test or a run.
    op = _MATH_OPS[int(rng.integers(len(_MATH_OPS)))]
    if op == "*":
        a, b = _number(rng, 2), _number(rng, 1)
        value = a * b
    else:
        lo, hi = (_EASY_LIMIT, _HARD_LIMIT) if rng.integers(2) else (0, _EASY_LIMIT)
        a, b = (int(x) for x in rng.integers(lo, hi, size=2))
        value = a + b if op == "+" else a - b
    return f"M {a}{op}{b}=", str(value)


# --- code: tiny list programs ----------------------------------------------------------------------

_LIST_OPS: dict[str, Callable[[list[int]], list[int] | int]] = {
    "rev": lambda xs: xs[::-1],
    "sort": sorted,
    "sum": sum,
    "max": max,
    "min": min,
    "inc": lambda xs: [(x + 1) % 10 for x in xs],
}

_LIST_OP_NAMES = tuple(sorted(_LIST_OPS))
# Shortest and longest input list. At most 4 (not 5) digits: "sum" and "sort" on 5 digits stay below
# 0.6 / 0.8 exact match for the embedded zoo's experts within their CPU time budget.
_LIST_LENGTHS = (2, 4)


def _sample_code(rng: np.random.Generator) -> Example:
    op = _LIST_OP_NAMES[int(rng.integers(len(_LIST_OP_NAMES)))]
    length = int(rng.integers(_LIST_LENGTHS[0], _LIST_LENGTHS[1] + 1))
    xs = [int(x) for x in rng.integers(0, 10, size=length)]
    out = _LIST_OPS[op](xs)
    answer = " ".join(map(str, out)) if isinstance(out, list) else str(out)
    return f"C {op} [{' '.join(map(str, xs))}]=", answer


# --- translation: toy SVO language -> toy SOV language ---------------------------------------------

# Source words are 3 letters, target words 2 letters (an injective lexicon), which keeps the longest
# example at 29 characters.
_NOUNS = {
    "cat": "ka", "dog": "mo", "fox": "ri", "owl": "tu", "cow": "se",
    "pig": "no", "rat": "pa", "bee": "lu", "ant": "vi", "elk": "ze",
}
_VERBS = {
    "saw": "bi", "ate": "do", "hit": "fa", "met": "ge", "fed": "hu", "got": "ji", "led": "ko", "bit": "ma",
}
_ADJECTIVES = {
    "big": "gu", "red": "ne", "old": "pe", "shy": "su", "wet": "ti", "fat": "wo", "odd": "ya", "new": "zu",
}
LEXICON: dict[str, str] = {**_NOUNS, **_VERBS, **_ADJECTIVES}
assert len(set(LEXICON.values())) == len(LEXICON), "the toy lexicon must be injective"
_NOUN_WORDS, _VERB_WORDS, _ADJECTIVE_WORDS = (tuple(sorted(d)) for d in (_NOUNS, _VERBS, _ADJECTIVES))


def _sample_translation(rng: np.random.Generator) -> Example:
    subj, obj = (_NOUN_WORDS[int(i)] for i in rng.integers(len(_NOUN_WORDS), size=2))
    verb = _VERB_WORDS[int(rng.integers(len(_VERB_WORDS)))]
    # At most one adjective keeps examples short: none (1/2), on the subject (1/4), on the object (1/4).
    where = (0, 0, 1, 2)[int(rng.integers(4))]
    adj = _ADJECTIVE_WORDS[int(rng.integers(len(_ADJECTIVE_WORDS)))]
    src_subj = [adj, subj] if where == 1 else [subj]
    src_obj = [adj, obj] if where == 2 else [obj]
    # Target grammar: noun before its adjective; subject, object, then verb.
    tgt_subj = [LEXICON[subj]] + ([LEXICON[adj]] if where == 1 else [])
    tgt_obj = [LEXICON[obj]] + ([LEXICON[adj]] if where == 2 else [])
    source = " ".join(src_subj + [verb] + src_obj)
    target = " ".join(tgt_subj + tgt_obj + [LEXICON[verb]])
    return f"T {source}=", target


# The hard half of each task (see the module docstring); the rest is the easy half.
_HARD_LIST_OPS = ("rev", "sort", "sum")


def is_hard(task_name: str, prompt: str) -> bool:
    """Whether a prompt of `task_name` belongs to the task's hard half (see the module docstring)."""
    body = prompt[2:-1]  # without the task marker and the final "="
    if task_name == "math":
        return any(len(x) >= 3 for x in body.replace("-", "+").replace("*", "+").split("+"))
    if task_name == "code":
        return body.split(" ", 1)[0] in _HARD_LIST_OPS
    if task_name == "translation":
        return any(w in _ADJECTIVES for w in body.split())
    raise ValueError(f"unknown task name {task_name!r}; expected one of {TASK_NAMES}")


_SAMPLERS: dict[str, Sampler] = {
    "math": _sample_math,
    "code": _sample_code,
    "translation": _sample_translation,
}
TASK_NAMES = ("math", "code", "translation")


# --- tasks and splits ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    """One generated task. Frozen and hashable; examples are a pure function of the fields.

    Attributes:
      name: one of TASK_NAMES.
      seed: base seed; the task's stream is seeded by (seed, a fixed hash of name), so tasks built
        with the same seed are still independent of each other.
      n_eval: number of evaluation examples, split into "search" and "heldout".
      n_train: number of training examples (the "train" split), disjoint from the evaluation set.
      search_fraction: share of the evaluation examples in the "search" split (the paper's 70%).
    """

    name: str
    seed: int = 0
    n_eval: int = 1000
    n_train: int = 5000
    search_fraction: float = 0.7

    def __post_init__(self):
        if self.name not in _SAMPLERS:
            raise ValueError(f"unknown task name {self.name!r}; expected one of {TASK_NAMES}")
        if self.n_eval < 2 or self.n_train < 0:
            raise ValueError(
                f"task {self.name!r}: n_eval must be >= 2 and n_train >= 0, got "
                f"n_eval={self.n_eval}, n_train={self.n_train}"
            )
        if not 0.0 < self.search_fraction < 1.0:
            raise ValueError(
                f"task {self.name!r}: search_fraction must be in (0, 1), got {self.search_fraction}"
            )

    @property
    def marker(self) -> str:
        """The task-marker prefix every prompt of this task starts with (e.g. "M ")."""
        return {"math": "M ", "code": "C ", "translation": "T "}[self.name]

    @property
    def n_search(self) -> int:
        """Size of the "search" split; at least one example is left for "heldout"."""
        return min(max(1, round(self.search_fraction * self.n_eval)), self.n_eval - 1)

    def examples(self, split: str) -> list[Example]:
        """The (prompt, answer) pairs of one split, in a fixed order.

        Args:
          split: "search", "heldout" or "train".

        Returns:
          A new list of (prompt, answer) string pairs; deterministic given the task's fields.
        """
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: unknown split {split!r}; expected one of {SPLITS}")
        pool = _unique_examples(self.name, self.seed, self.n_eval + self.n_train)
        bounds = {
            "search": (0, self.n_search),
            "heldout": (self.n_search, self.n_eval),
            "train": (self.n_eval, self.n_eval + self.n_train),
        }
        lo, hi = bounds[split]
        return list(pool[lo:hi])


@functools.lru_cache(maxsize=32)
def _unique_examples(name: str, seed: int, count: int) -> tuple[Example, ...]:
    """The first `count` distinct examples (distinct prompts) of the task's seeded stream."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    sample = _SAMPLERS[name]
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(_MAX_DRAWS_PER_EXAMPLE * max(count, 1)):
        if len(out) == count:
            break
        prompt, answer = sample(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    if len(out) < count:
        raise ValueError(
            f"task {name!r} produced only {len(out)} distinct examples of the {count} requested "
            f"(n_eval + n_train); ask for fewer"
        )
    return tuple(out)


def tasks(seed: int = 0, n_eval: int = 1000, n_train: int = 5000) -> tuple[Task, ...]:
    """The embedded suite in its fixed order: math, code, translation.

    Args:
      seed: base seed shared by the three tasks (each derives its own stream from it).
      n_eval: evaluation examples per task (70% "search", 30% "heldout").
      n_train: training examples per task, disjoint from the evaluation examples.

    Returns:
      A tuple of Task, one per name in TASK_NAMES.
    """
    return tuple(Task(name, seed=seed, n_eval=n_eval, n_train=n_train) for name in TASK_NAMES)
