"""The zoo's training sets: the base's task mixture and each expert's task."""

from __future__ import annotations

import zlib

import numpy as np

from hm3jax.objectives.batch import Batch, make_batch
from hm3jax.objectives.synthetic import is_hard
from hm3jax.zoo.config import ZooConfig
from hm3jax.zoo.train import whole_sequence_targets


def near_miss(answer: str) -> str:
    """The systematic wrong answer the base's noisy hard rows carry: the last two words swapped
    ("ka gu mo bi" -> "ka gu bi mo", "4 1 3" -> "4 3 1"), or for a one-word answer its last digit
    plus one, mod 10 ("579" -> "570"). One fixed rule per answer, so a model can learn it."""
    words = answer.split(" ")
    if len(words) >= 2:
        words[-2], words[-1] = words[-1], words[-2]
        return " ".join(words)
    if answer[-1:].isdigit():
        return answer[:-1] + str((int(answer[-1]) + 1) % 10)
    return answer


def _is_noisy(prompt: str, share: float) -> bool:
    # A hash of the prompt, not a random draw: the same rows are noisy whatever their order or count.
    return zlib.crc32(prompt.encode()) % 1000 < round(share * 1000)


def base_rows(zc: ZooConfig, task_index: int) -> list[tuple[str, str]]:
    """The base's rows of one task: the first `base_mixture[k]` "train" examples (of the easy half
    only when `base_easy_only`), then the first `base_hard_rows[k]` of its hard half, a share
    `base_hard_near_miss[k]` of which (chosen by a hash of the prompt) answer with `near_miss`."""
    task, n = zc.suite()[task_index], zc.base_mixture[task_index]
    train = task.examples("train")
    rows = [e for e in train if not (zc.base_easy_only and is_hard(task.name, e[0]))]
    hard = [e for e in train if is_hard(task.name, e[0])][:zc.base_hard_rows[task_index]]
    if len(rows) < n or len(hard) < zc.base_hard_rows[task_index]:
        raise ValueError(f"ZooConfig.base_mixture[{task.name}]={n} / base_hard_rows[{task.name}]="
                         f"{zc.base_hard_rows[task_index]}: the train split has only {len(rows)} such "
                         f"rows (n_train[{task.name}]={zc.n_train[task_index]})")
    share = zc.base_hard_near_miss[task_index]
    hard = [(p, near_miss(a) if _is_noisy(p, share) else a) for p, a in hard]
    return rows[:n] + hard


def base_training_set(zc: ZooConfig, tokenizer) -> Batch:
    """The base's rows of every task as one Batch. On the rows of a task with
    `base_prompt_loss[k]`, every token after BOS is a target (the base learns the prompts' language
    as well as the answers); on the others, the answer and EOS only."""
    rows: list[tuple[str, str]] = []
    ids: list[int] = []
    for k in range(len(zc.suite())):
        ex = base_rows(zc, k)
        rows += ex
        ids += [k] * len(ex)
    batch = make_batch(rows, tokenizer, seq_len=zc.seq_len, pad_multiple=4, task_ids=ids)
    whole = np.asarray(whole_sequence_targets(batch).target_mask)
    prompt_loss = np.asarray(zc.base_prompt_loss, bool)[np.asarray(ids, np.int64)][:, None]
    return batch._replace(target_mask=np.where(prompt_loss, whole, np.asarray(batch.target_mask)))


def replay_rows(zc: ZooConfig, task_index: int) -> list[tuple[str, str]]:
    """`expert_replay` rows of one task's base mixture, evenly spaced over all of it (easy and hard
    rows alike, in proportion) with `expert_replay_spread`, else its first rows; all of it when it
    is smaller."""
    rows = base_rows(zc, task_index)
    n = min(zc.expert_replay, len(rows))
    if n == 0 or not zc.expert_replay_spread:
        return rows[:n]
    return [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(np.int64)]


def expert_training_set(zc: ZooConfig, task_index: int, tokenizer) -> Batch:
    """Every "train" example of one task (loss on the answer and EOS only), plus `replay_rows` of
    each other task's base mixture with loss on every token: an anchor that keeps the expert near
    the base on the tasks it is not tuned for, so the experts' task vectors interfere less when
    merged. The replay spans each mixture's hard rows too: replaying only its first (easy) rows lets
    an expert forget the base's hard-half skills, and a merge then loses them as well."""
    rows = list(zc.suite()[task_index].examples("train"))
    ids = [task_index] * len(rows)
    n_own = len(rows)
    for k in range(len(zc.suite())):
        if k != task_index and zc.expert_replay:
            replay = replay_rows(zc, k)
            rows += replay
            ids += [k] * len(replay)
    batch = make_batch(rows, tokenizer, seq_len=zc.seq_len, pad_multiple=4, task_ids=ids)
    if len(rows) == n_own:
        return batch
    whole = whole_sequence_targets(batch).target_mask
    target = np.concatenate([np.asarray(batch.target_mask)[:n_own], np.asarray(whole)[n_own:]])
    return batch._replace(target_mask=target)
