"""Turn (prompt, answer) pairs into padded arrays for teacher-forced scoring.

Row layout (right padded to a common length S):
    tokens          prompt ids (as the tokenizer encodes them, BOS included) + answer ids + EOS + pad
    attention_mask  1 on real tokens, 0 on padding
    target_mask     True at position t when the prediction made there (of tokens[t + 1]) is scored:
                    the last prompt position through the last answer position, so the answer
                    tokens and the EOS are the scored targets
    task_id         which task each row belongs to (index into the suite), for per-task means

Building a batch is host-side (tokenizer calls, numpy); the arrays then go to jitted scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

Example = tuple[str, str]


class Batch(NamedTuple):
    """Padded scoring batch (a pytree: pass it straight into jitted functions).

    Attributes:
      tokens: [N, S] int32 token ids.
      attention_mask: [N, S] int32, 1 on real tokens.
      target_mask: [N, S] bool, True where the next-token prediction is scored.
      task_id: [N] int32 task index of each row.
    """

    tokens: Any
    attention_mask: Any
    target_mask: Any
    task_id: Any


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos id, pad id) of a tokenizer: ValueError without an EOS token; EOS stands in for a missing pad."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id; scoring needs an EOS token "
            "to mark the end of each answer"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    # The pad id never reaches a score (masks exclude it); EOS is a safe stand-in when none is set.
    return int(eos), int(eos if pad is None else pad)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_batch(
    examples: Sequence[Example],
    tokenizer,
    seq_len: int | None = None,
    pad_multiple: int = 8,
    task_ids: Sequence[int] | int = 0,
) -> Batch:
    """Tokenize and pad (prompt, answer) pairs.

    Args:
      examples: N (prompt, answer) string pairs, N >= 1.
      tokenizer: a transformers tokenizer (e.g. objectives.tokenizer.build_tokenizer()); prompts are
        encoded with its special tokens (BOS), answers without, then EOS is appended.
      seq_len: fixed padded length S; None uses the longest row rounded up to `pad_multiple` (a few
        distinct lengths keep the number of jit compilations small).
      pad_multiple: rounding for the automatic length.
      task_ids: one task index for all rows, or one per example.

    Returns:
      Batch of numpy arrays with N rows.
    """
    if len(examples) == 0:
        raise ValueError("make_batch: no examples given; need at least one (prompt, answer) pair")
    if pad_multiple < 1:
        raise ValueError(f"make_batch: pad_multiple must be >= 1, got {pad_multiple}")
    eos_id, pad_id = special_ids(tokenizer)
    prompts = [p for p, _ in examples]
    answers = [a for _, a in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]

    rows = []
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if len(p) == 0:
            raise ValueError(f"make_batch: example {i} ({examples[i]!r}) has an empty prompt encoding")
        rows.append((list(p), list(a) + [eos_id]))
    longest = max(len(p) + len(a) for p, a in rows)
    if seq_len is None:
        seq_len = _round_up(longest, pad_multiple)
    elif longest > seq_len:
        worst = max(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        raise ValueError(
            f"make_batch: example {worst} ({examples[worst]!r}) needs {longest} tokens "
            f"(prompt + answer + EOS) but seq_len={seq_len}; raise seq_len or pass None"
        )

    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((n, seq_len), np.int32)
    target_mask = np.zeros((n, seq_len), bool)
    for i, (p, a) in enumerate(rows):
        length = len(p) + len(a)
        tokens[i, :length] = p + a
        attention_mask[i, :length] = 1
        # Position t predicts tokens[t + 1]: the last prompt position predicts the first answer
        # token, and the position before EOS predicts EOS.
        target_mask[i, len(p) - 1 : length - 1] = True

    task_id = np.broadcast_to(np.asarray(task_ids, np.int32), (n,)).copy()
    return Batch(tokens, attention_mask, target_mask, task_id)


def make_suite_batch(
    tasks: Sequence[Any],
    split: str,
    tokenizer,
    seq_len: int | None = None,
    pad_multiple: int = 8,
) -> Batch:
    """One batch holding every task's examples of `split`, rows tagged with the task's index.

    Args:
      tasks: objects with `.examples(split)` (e.g. objectives.tasks()); row i of the result has
        task_id = the position of its task in this sequence.
      split: passed to `.examples`.
      tokenizer, seq_len, pad_multiple: as in make_batch.

    Returns:
      Batch with the tasks' rows concatenated in order.
    """
    examples: list[Example] = []
    ids: list[int] = []
    for k, task in enumerate(tasks):
        ex = task.examples(split)
        examples.extend(ex)
        ids.extend([k] * len(ex))
    return make_batch(examples, tokenizer, seq_len=seq_len, pad_multiple=pad_multiple, task_ids=ids)


def pad_rows(batch: Batch, multiple: int) -> Batch:
    """Append empty rows (no attention, no targets) so N is a multiple of `multiple`.

    Empty rows have an all-False target_mask; scoring.task_means gives them zero weight.
    """
    n = batch.tokens.shape[0]
    extra = _round_up(n, multiple) - n
    if extra == 0:
        return batch
    return Batch(
        *(np.concatenate([np.asarray(x), np.zeros((extra,) + x.shape[1:], x.dtype)]) for x in batch)
    )
