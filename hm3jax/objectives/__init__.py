"""What a merged model is scored on: the embedded task suite, its tokenizer, batching and scorers."""

from hm3jax.objectives.batch import Batch, make_batch, make_suite_batch, pad_rows
from hm3jax.objectives.scoring import (
    answer_loglik,
    exact_match,
    make_path_scorer,
    task_means,
    token_logprobs,
)
from hm3jax.objectives.synthetic import MAX_EXAMPLE_CHARS, SPLITS, TASK_NAMES, Task, tasks
from hm3jax.objectives.tokenizer import VOCAB_SIZE, build_tokenizer, save_tokenizer

__all__ = [
    "MAX_EXAMPLE_CHARS",
    "SPLITS",
    "TASK_NAMES",
    "VOCAB_SIZE",
    "Batch",
    "Task",
    "answer_loglik",
    "build_tokenizer",
    "exact_match",
    "make_batch",
    "make_path_scorer",
    "make_suite_batch",
    "pad_rows",
    "save_tokenizer",
    "task_means",
    "tasks",
    "token_logprobs",
]
