"""Scoring batches and teacher-forced scores on hand-made inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hm3jax.models
from hm3jax.objectives import (
    Batch,
    answer_loglik,
    build_tokenizer,
    exact_match,
    make_batch,
    make_path_scorer,
    make_suite_batch,
    task_means,
    tasks,
)
from hm3jax.objectives.tokenizer import BOS_ID, EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_make_batch_layout(tokenizer):
    batch = make_batch([("M 1+2=", "3"), ("C sum [1 2]=", "3")], tokenizer, task_ids=[0, 1])
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == (2, 16)  # 14 rounded up to 8s
    prompt = tokenizer("M 1+2=")["input_ids"]
    answer = tokenizer("3", add_special_tokens=False)["input_ids"]
    row = prompt + answer + [EOS_ID]
    assert row[0] == BOS_ID and len(row) == 9
    np.testing.assert_array_equal(batch.tokens[0], row + [PAD_ID] * 7)
    np.testing.assert_array_equal(batch.attention_mask[0], [1] * 9 + [0] * 7)
    # Predictions at the last prompt position ("=") and at the answer "3" are scored.
    np.testing.assert_array_equal(np.flatnonzero(batch.target_mask[0]), [6, 7])
    np.testing.assert_array_equal(np.flatnonzero(batch.target_mask[1]), [12, 13])
    np.testing.assert_array_equal(batch.task_id, [0, 1])
    with pytest.raises(ValueError, match="seq_len=8"):
        make_batch([("M 1+2=", "3")], tokenizer, seq_len=8)
    with pytest.raises(ValueError, match="no examples"):
        make_batch([], tokenizer)


def test_suite_batch_task_ids(tokenizer):
    suite = tasks(seed=0, n_eval=10, n_train=0)
    batch = make_suite_batch(suite, "heldout", tokenizer)
    np.testing.assert_array_equal(batch.task_id, [0] * 3 + [1] * 3 + [2] * 3)
    assert batch.tokens.shape[1] % 8 == 0


def _hand_batch():
    # Row 0 scores predictions at positions 1 and 2 (targets tokens[2] = 1, tokens[3] = 0);
    # row 1 scores position 0 (target tokens[1] = 2); row 2 is an empty padding row.
    tokens = np.array([[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0]], np.int32)
    target_mask = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    return Batch(tokens, (tokens > 0).astype(np.int32), target_mask, np.array([0, 1, 1], np.int32))


def _hand_logits():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = np.zeros((3, 4, 3), np.float32)
    logits[0, 0] = [9, 0, 0]        # not scored: a wrong argmax here must not matter
    logits[0, 1] = [0, ln3, 0]      # target 1: p = 3/5, argmax
    logits[0, 2] = [ln2, ln2, 0]    # target 0: p = 2/5, argmax tied with 1 -> first index (0) wins
    logits[1, 0] = [ln2, 0, 0]      # target 2: p = 1/4, not the argmax
    return jnp.asarray(logits)


def test_exact_match_and_loglik_by_hand():
    batch, logits = _hand_batch(), _hand_logits()
    np.testing.assert_array_equal(exact_match(logits, batch), [1.0, 0.0, 1.0])
    expected = [(math.log(3 / 5) + math.log(2 / 5)) / 2, math.log(1 / 4), 0.0]
    np.testing.assert_allclose(answer_loglik(logits, batch), expected, rtol=1e-6)
    # A tie where the target is the later index is not a greedy match.
    tied = logits.at[0, 1].set(jnp.array([3.0, 3.0, 0.0]))  # target 1 ties with 0
    assert float(exact_match(tied, batch)[0]) == 0.0


def test_task_means_ignore_empty_rows_and_jit():
    batch, logits = _hand_batch(), _hand_logits()
    em = jax.jit(exact_match)(logits, batch)
    assert float(task_means(em, batch)) == pytest.approx(0.5)  # padding row has no weight
    np.testing.assert_allclose(task_means(em, batch, num_tasks=3), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="logits must be"):
        exact_match(logits[:, :3], batch)


def _fake_forward_path(cfg, shell, pool, path, tokens, attention_mask=None):
    # Logit s on the true next token, 0 elsewhere, where s = sum of the pool entries on the path.
    s = jnp.sum(jnp.where(path >= 0, pool[jnp.clip(path, 0)], 0.0))
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    return s * jax.nn.one_hot(nxt, cfg["vocab"], dtype=jnp.float32) * attention_mask[..., None]


def test_path_scorer_vmaps_and_chunks(monkeypatch, tokenizer):
    monkeypatch.setattr(hm3jax.models, "forward_path", _fake_forward_path, raising=False)
    suite = tasks(seed=0, n_eval=10, n_train=0)
    batch = make_suite_batch(suite, "search", tokenizer)  # 7 rows per task
    cfg, pool = {"vocab": len(tokenizer)}, jnp.array([1.0, 2.0, -3.0])
    paths = jnp.array([[0, 1, -1], [2, -1, -1], [-1, -1, -1]])
    sums = np.array([3.0, -3.0, 0.0])

    score = make_path_scorer(cfg, None, pool, batch)
    em, ll = jax.vmap(score)(paths)
    # With s > 0 every target is the argmax; ll = s - log(e^s + V - 1) at every scored position.
    np.testing.assert_allclose(em, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ll, sums - np.log(np.exp(sums) + len(tokenizer) - 1), rtol=1e-5)

    per_task = make_path_scorer(cfg, None, pool, batch, num_tasks=3, chunk_size=4)
    em_k, ll_k = jax.vmap(per_task)(paths)
    assert em_k.shape == (3, 3)
    np.testing.assert_allclose(em_k.mean(axis=1), em, rtol=1e-6)
    np.testing.assert_allclose(ll_k.mean(axis=1), ll, rtol=1e-5)


def _random_params(cfg, seed):
    # Plain normal draws in the params layout: much cheaper than models.init_params, and enough for
    # checking that the scorer agrees with the decoder.
    from hm3jax.models.params import param_shapes, set_path

    params, rng = {}, np.random.default_rng(seed)
    for path, shape in param_shapes(cfg).items():
        is_norm = path[0] == "norm" or path[-2].endswith("layernorm")  # RMSNorm gains sit near 1
        value = float(is_norm) + 0.1 * rng.standard_normal(shape)
        set_path(params, path, jnp.asarray(value, jnp.float32))
    return params


@pytest.mark.slow
def test_path_scorer_on_the_decoder(tokenizer):
    from hm3jax import models

    cfg = models.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
    params = [_random_params(cfg, seed) for seed in (0, 1)]
    pool = models.build_pool(params)
    shell = models.shell_of(params[0])
    batch = make_suite_batch(tasks(seed=0, n_eval=6, n_train=0), "search", tokenizer)
    score = make_path_scorer(cfg, shell, pool, batch, num_tasks=3, chunk_size=4)

    logits = models.forward(cfg, params[0], batch.tokens, batch.attention_mask)
    want_em = task_means(exact_match(logits, batch), batch, 3)
    want_ll = task_means(answer_loglik(logits, batch), batch, 3)
    # Path 0 is model 0's own layers, i.e. the plain model. One vmapped call keeps this test to a
    # single compilation of the scorer.
    paths = jnp.array([[0, 1], [2, -1], [-1, 3], [-1, -1]])
    em_v, ll_v = jax.vmap(score)(paths)
    np.testing.assert_allclose(em_v[0], want_em)
    np.testing.assert_allclose(ll_v[0], want_ll, rtol=1e-5)
    assert np.all(np.asarray(ll_v) < 0) and not np.allclose(ll_v[1], ll_v[2])
