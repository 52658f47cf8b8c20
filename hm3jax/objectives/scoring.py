"""Teacher-forced scores from logits: exact match and answer log-likelihood (pure, jittable).

Exact match under greedy decoding equals "every answer token and the EOS are the argmax of the
prediction made one position earlier", so one forward pass scores a candidate without a decoding loop.
`make_path_scorer` wraps this around the layer-path forward pass for the search.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax import models
from hm3jax.objectives.batch import Batch, pad_rows
from hm3jax.settings import OBJECTIVES


def _shifted(logits: jax.Array, batch: Batch):
    """Predictions at positions 0..S-2 with their targets tokens[1..S-1] and the scored-mask."""
    if logits.ndim != 3 or logits.shape[:2] != batch.tokens.shape:
        raise ValueError(
            f"logits must be [N, S, V] with [N, S] = tokens.shape {tuple(batch.tokens.shape)}; "
            f"got {tuple(logits.shape)}"
        )
    return logits[:, :-1], batch.tokens[:, 1:], batch.target_mask[:, :-1]


def exact_match(logits: jax.Array, batch: Batch) -> jax.Array:
    """Per-example teacher-forced exact match.

    Args:
      logits: [N, S, V] next-token logits for batch.tokens.
      batch: Batch from objectives.batch (target_mask marks the scored predictions).

    Returns:
      [N] float32, 1.0 where every scored target is the argmax (first index on ties, as greedy
      decoding picks), else 0.0. A row with no scored positions counts as 1.0; task_means gives such
      rows zero weight.
    """
    logits, targets, mask = _shifted(logits, batch)
    hit = jnp.argmax(logits, axis=-1) == targets
    return jnp.all(hit | ~mask, axis=-1).astype(jnp.float32)


def token_logprobs(logits: jax.Array, batch: Batch) -> jax.Array:
    """[N, S-1] float32 log p(tokens[t+1] | tokens[:t+1]); zero where the target is not scored."""
    logits, targets, mask = _shifted(logits, batch)
    logits = logits.astype(jnp.float32)
    # Gather the target logit and subtract logsumexp: no [N, S, V] log-softmax is materialised.
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(mask, logp, 0.0)


def answer_loglik(logits: jax.Array, batch: Batch) -> jax.Array:
    """Per-example mean log-likelihood of the answer tokens and EOS.

    Args:
      logits: [N, S, V] next-token logits for batch.tokens.
      batch: Batch from objectives.batch.

    Returns:
      [N] float32 mean over scored positions of log p(target) (<= 0); 0.0 for a row with none.
    """
    mask = batch.target_mask[:, :-1]
    total = token_logprobs(logits, batch).sum(axis=-1)
    return total / jnp.maximum(mask.sum(axis=-1), 1).astype(jnp.float32)


def answer_prob(logits: jax.Array, batch: Batch) -> jax.Array:
    """Per-example probability of the whole answer (and EOS) under teacher forcing.

    Args:
      logits: [N, S, V] next-token logits for batch.tokens.
      batch: Batch from objectives.batch.

    Returns:
      [N] float32 exp(sum of the answer's token log-probabilities), in [0, 1]: the chance that
      sampling reproduces the answer, a smooth stand-in for exact_match (1.0 for a row with no
      scored positions; task_means gives such rows zero weight).
    """
    return jnp.exp(token_logprobs(logits, batch).sum(axis=-1))


def task_means(values: jax.Array, batch: Batch, num_tasks: int | None = None) -> jax.Array:
    """Mean of per-example values, overall or per task; rows without scored targets are ignored.

    Args:
      values: [N] per-example scores (e.g. exact_match(...)).
      batch: the Batch the values came from (task_id and target_mask are used).
      num_tasks: None for one overall mean (scalar); K for a [K] vector of per-task means
        (a task with no rows gets 0.0).

    Returns:
      float32 scalar or [num_tasks].
    """
    weight = jnp.any(batch.target_mask, axis=-1).astype(jnp.float32)
    if num_tasks is None:
        return jnp.sum(values * weight) / jnp.maximum(weight.sum(), 1.0)
    sums = jax.ops.segment_sum(values * weight, batch.task_id, num_segments=num_tasks)
    counts = jax.ops.segment_sum(weight, batch.task_id, num_segments=num_tasks)
    return sums / jnp.maximum(counts, 1.0)


def make_path_scorer(
    cfg,
    shell,
    pool,
    batch: Batch,
    num_tasks: int | None = None,
    chunk_size: int | None = None,
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """A jitted scorer of one inference path over a fixed batch.

    Args:
      cfg: ModelConfig of the pool (static).
      shell: embeddings / final norm / head params (see models.pool).
      pool: stacked layer pool.
      batch: Batch to score on (e.g. make_suite_batch(tasks, "search", tokenizer)).
      num_tasks: None for overall means; K for per-task means using batch.task_id.
      chunk_size: score the rows in chunks of this many (lax.map) to bound activation memory,
        which matters when the scorer is vmapped over many paths; None scores all rows at once.
        Small models can score faster in small chunks whose activations stay in cache (see
        benchmarks/README.md).

    Returns:
      score(path) -> (exact_match_mean, loglik_mean): path is an int array of pool indices (-1 =
      skip); the means are scalars, or [num_tasks] when num_tasks is given. `jax.vmap(score)` scores
      a [P, T] batch of paths.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"make_path_scorer: chunk_size must be >= 1 or None, got {chunk_size}")
        batch = pad_rows(batch, chunk_size)
    batch = Batch(*(jnp.asarray(np.asarray(x)) for x in batch))

    def per_example(shell, pool, path, rows: Batch):
        logits = models.forward_path(
            cfg, shell, pool, path, rows.tokens, attention_mask=rows.attention_mask
        )
        return exact_match(logits, rows), answer_loglik(logits, rows)

    @jax.jit
    def _score(shell, pool, batch, path):
        if chunk_size is None:
            em, ll = per_example(shell, pool, path, batch)
        else:
            chunks = jax.tree.map(lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), batch)
            em, ll = jax.lax.map(lambda rows: per_example(shell, pool, path, rows), chunks)
            em, ll = em.reshape(-1), ll.reshape(-1)
        return task_means(em, batch, num_tasks), task_means(ll, batch, num_tasks)

    def score(path):
        # shell, pool and batch are jit arguments, not closed-over constants, so large pools are
        # not baked into the compiled program.
        return _score(shell, pool, batch, path)

    return score


SCORE_OBJECTIVES = (*OBJECTIVES, "answer_prob")  # the run objectives, and the search rows' smooth stand-in


def make_params_scorer(cfg, batch: Batch, num_tasks: int, objective: str = "exact_match",
                       chunk_size: int | None = None) -> Callable[[dict], jax.Array]:
    """params -> [num_tasks] per-task scores of a model on `batch`, higher is better (jittable,
    vmappable over params, e.g. over the merges of several preferences).

    Args:
      cfg: ModelConfig (static). batch: the rows to score (rows tagged by task_id).
      objective: "exact_match" (teacher-forced, in [0, 1]), "loglik" (mean answer
        log-likelihood per example, <= 0; smooth, so it still ranks models whose exact match is ~0)
        or "answer_prob" (the probability of the whole answer, in [0, 1]; see answer_prob).
      chunk_size: score the rows in chunks of this many (lax.map) to bound activation memory; None
        scores all rows at once.
    """
    if objective not in SCORE_OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not supported; supported: {', '.join(SCORE_OBJECTIVES)}")
    per_example = {"exact_match": exact_match, "loglik": answer_loglik, "answer_prob": answer_prob}[objective]
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"make_params_scorer: chunk_size must be >= 1 or None, got {chunk_size}")
        batch = pad_rows(batch, chunk_size)
    b = Batch(*(jnp.asarray(np.asarray(x)) for x in batch))

    def rows_score(params, rows: Batch):
        return per_example(models.forward(cfg, params, rows.tokens, rows.attention_mask), rows)

    def score(params):
        if chunk_size is None:
            vals = rows_score(params, b)
        else:
            chunks = jax.tree.map(lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), b)
            vals = jax.lax.map(lambda rows: rows_score(params, rows), chunks).reshape(-1)
        return task_means(vals, b, num_tasks)

    return score
