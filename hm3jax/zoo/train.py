"""Next-token training of a decoder on padded task batches (how the zoo's models are trained).

`train_chunk(cfg, opt, batch_size, n_steps, state, key, data, n_rows, schedule)` is one jitted
`lax.scan` over `n_steps` optimizer steps; each step samples rows of an on-device dataset, computes
the masked cross-entropy and applies AdamW. `fit` loops over chunks with a progress bar (the only
side effect, kept outside the compiled program).

Only shapes and static settings are compiled in: the learning-rate schedule is an argument of
traced scalars, the loss positions come with the data (`Batch.target_mask`), and `fit` pads each
dataset to a power-of-two row count with its true count an argument, so runs that differ only in
data, dataset size (within a factor of two), step counts or learning rate share one program (the
experts of the zoo do).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from hm3jax.models.config import ModelConfig
from hm3jax.models.decoder import forward
from hm3jax.objectives.batch import Batch


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Static AdamW settings (hashable: part of the compiled program)."""

    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.01
    grad_clip: float = 1.0


class Schedule(NamedTuple):
    """Learning rate: linear warmup to `peak`, cosine decay to 10% of it at `total_steps`.

    Fields are float32 scalars (traced), so a new schedule does not recompile.
    """

    peak: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array


def make_schedule(peak: float, warmup_steps: int, total_steps: int) -> Schedule:
    """A Schedule of float32 scalars; checks 0 <= warmup_steps < total_steps."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps < total_steps; got "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    return Schedule(*(jnp.float32(x) for x in (peak, warmup_steps, total_steps)))


def learning_rate(schedule: Schedule, step: jax.Array) -> jax.Array:
    """The learning rate (float32 scalar) for update number `step` (0-based)."""
    step = step.astype(jnp.float32)
    warm = schedule.peak * (step + 1) / jnp.maximum(schedule.warmup_steps, 1.0)
    frac = jnp.clip((step - schedule.warmup_steps)
                    / jnp.maximum(schedule.total_steps - schedule.warmup_steps, 1.0), 0.0, 1.0)
    decay = schedule.peak * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < schedule.warmup_steps, warm, decay)


class TrainState(NamedTuple):
    """Carried training state.

    Attributes:
      params: params pytree (layout of models/params.py).
      opt_state: state of `optimizer(opt)`.
      step: int32 scalar, number of updates applied.
    """

    params: dict
    opt_state: optax.OptState
    step: jax.Array


def whole_sequence_targets(batch: Batch) -> Batch:
    """The batch with every real token after BOS as a target (instead of answer + EOS only).

    Position t predicts tokens[t + 1], so the target mask is the attention mask shifted left.
    """
    attn = np.asarray(batch.attention_mask).astype(bool)
    target = np.zeros_like(attn)
    target[:, :-1] = attn[:, 1:]
    return batch._replace(target_mask=target)


def lm_loss(cfg: ModelConfig, params: dict, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy (float32 scalar) over the positions of `batch.target_mask`.

    Args:
      cfg: model architecture (static).
      params: params pytree.
      batch: Batch of [N, S] arrays; target_mask[n, t] marks the prediction of tokens[n, t + 1].
    """
    logits = forward(cfg, params, batch.tokens, attention_mask=batch.attention_mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch.tokens[:, 1:])
    mask = batch.target_mask[:, :-1].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0)


def _decay_mask(params: dict) -> dict:
    # Weight decay on projections and embeddings only: decaying RMSNorm gains pulls them towards
    # zero instead of their natural value one. (Stacked norm gains are 2-D, so ndim cannot decide.)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params)


@functools.cache
def optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    """AdamW without its learning rate (applied per step from the Schedule), with clipping.

    Cached so that equal configs give the same object (a stable static argument for jit).
    """
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
        optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
    )


def init_state(params: dict, opt: OptimConfig) -> TrainState:
    """A TrainState at step 0 for `params` (the arrays are copied: training donates its state)."""
    params = jax.tree.map(jnp.array, params)
    return TrainState(params, optimizer(opt).init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=4)
def train_chunk(cfg: ModelConfig, opt: OptimConfig, batch_size: int, n_steps: int, state: TrainState,
                key: jax.Array, data: Batch, n_rows: jax.Array,
                schedule: Schedule) -> tuple[TrainState, jax.Array]:
    """Apply `n_steps` AdamW updates; return (new state, losses float32 [n_steps]).

    Each step draws `batch_size` of the first `n_rows` rows of `data` uniformly with replacement, from
    `fold_in(key, state.step)`: the sample sequence depends on the key and the global step only,
    not on how the steps are split into chunks. `state` is donated (do not reuse it).

    Args:
      cfg, opt, batch_size, n_steps: static; one compilation per combination and data shape.
      state: TrainState.
      key: PRNG key of this run.
      data: the training set, Batch of [N, S] arrays; target_mask selects the loss positions
        (see whole_sequence_targets). Rows from `n_rows` on are padding, never drawn.
      n_rows: int32 scalar, the number of real rows (1 <= n_rows <= N).
      schedule: learning-rate Schedule.
    """
    tx = optimizer(opt)

    def step(state: TrainState, _):
        rows = jax.random.randint(jax.random.fold_in(key, state.step), (batch_size,), 0, n_rows)
        batch = jax.tree.map(lambda x: x[rows], data)
        loss, grads = jax.value_and_grad(lm_loss, argnums=1)(cfg, state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(schedule, state.step)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    return jax.lax.scan(step, state, None, length=n_steps)


def fit(cfg: ModelConfig, opt: OptimConfig, params: dict, data: Batch, key: jax.Array, *, steps: int,
        batch_size: int, learning_rate: float, warmup_steps: int, chunk_steps: int, desc: str = "train",
        position: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """Train a copy of `params` for `steps` steps on `data` (rows sampled with replacement).

    Args:
      cfg, opt: architecture and AdamW settings.
      params: starting params (not modified).
      data: training Batch; target_mask selects the loss positions.
      key: PRNG key of the run (batch sampling).
      steps, batch_size: updates and rows per update; `steps` must be a multiple of `chunk_steps`.
      learning_rate, warmup_steps: peak rate and warmup of the schedule (cosine decay to 10%).
      chunk_steps: updates per jitted call (and per progress-bar refresh).
      desc, position, progress: the tqdm bar's label, line, and whether to show it.

    Returns:
      (params, stats) with stats = {"final_loss": mean loss of the last chunk, "train_seconds",
      "cpu_seconds": CPU time of this process}.
    """
    if chunk_steps < 1 or steps % chunk_steps:
        raise ValueError(f"steps={steps} must be a positive multiple of chunk_steps={chunk_steps}")
    wall, cpu = time.perf_counter(), time.process_time()
    state = init_state(params, opt)
    schedule = make_schedule(learning_rate, warmup_steps, steps)
    n_rows = jnp.int32(data.tokens.shape[0])
    data = device_batch(_pad_rows(data, _bucket(data.tokens.shape[0])))
    loss = float("nan")
    with tqdm(total=steps, desc=f"{desc:<11}", unit="step", position=position, disable=not progress) as bar:
        for _ in range(steps // chunk_steps):
            state, losses = train_chunk(cfg, opt, batch_size, chunk_steps, state, key, data, n_rows,
                                        schedule)
            loss = float(losses.mean())
            bar.update(chunk_steps)
            bar.set_postfix(loss=f"{loss:.3f}")
    return state.params, {"final_loss": loss, "train_seconds": time.perf_counter() - wall,
                          "cpu_seconds": time.process_time() - cpu}


def _bucket(n: int) -> int:
    """The padded row count of an n-row dataset: the next power of two (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` with zero rows appended up to `rows` rows (empty batches are left for device_batch)."""
    n = np.shape(batch.tokens)[0]
    if n == 0 or n == rows:
        return batch
    arrays = [np.asarray(x) for x in batch]
    return Batch(*(np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)]) for x in arrays))


def device_batch(batch: Batch) -> Batch:
    """The batch's arrays as jax arrays (do it once per dataset, not per chunk)."""
    if batch.tokens.shape[0] == 0:
        raise ValueError("empty dataset: the Batch has no rows")
    return Batch(*(jnp.asarray(np.asarray(x)) for x in batch))
