"""Greedy generation with a KV cache: parity with transformers' generate and with full forwards."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_models import FAMILIES, random_params, torch_model

from hm3jax.models import PoolError, build_pool, forward_path, shell_of
from hm3jax.models.generation import _generate, generate, generate_path

jax.config.update("jax_default_matmul_precision", "highest")

PAD = 0


def left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask [B, max len] with each row right-aligned (as transformers pads for generation)."""
    P = max(len(r) for r in rows)
    tokens = np.full((len(rows), P), PAD, np.int64)
    mask = np.zeros((len(rows), P), np.int64)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = r
        mask[i, P - len(r):] = 1
    return tokens, mask


def hf_generate(model, tokens, mask, n: int, eos, pad: int = PAD) -> np.ndarray:
    """transformers' greedy tokens after the prompt, right-filled with pad to n columns."""
    with torch.no_grad():
        out = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos,
                             pad_token_id=pad).numpy()[:, tokens.shape[1]:]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)


def naive_greedy(logits_fn, tokens, mask, n: int) -> np.ndarray:
    """Reference decoding: a full forward over the whole sequence per token, no cache.

    The sequence lives in one right-padded buffer so the forward compiles once; masked columns
    on the right do not change the logits of the columns before them.
    """
    B, P = tokens.shape
    buf = np.concatenate([tokens, np.full((B, n), PAD, tokens.dtype)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((B, n), mask.dtype)], axis=1)
    for i in range(n):
        logits = np.asarray(logits_fn(jnp.asarray(buf), jnp.asarray(buf_mask)))
        buf[:, P + i] = logits[:, P + i - 1].argmax(-1)
        buf_mask[:, P + i] = 1
    return buf[:, P:]


# ------------------------------------------------------------------- tiny models vs transformers
# Untied Qwen2: with tied embeddings random weights mostly echo the last token, a weak test.
PARITY = {
    "llama_gqa": FAMILIES["llama_gqa_untied"],
    "qwen2_bias": FAMILIES["qwen2_bias_tied"].replace(tie_word_embeddings=False),
    "mistral_sliding_window": FAMILIES["mistral_sliding_window"],
}


@pytest.mark.parametrize("name", sorted(PARITY))
@pytest.mark.slow
def test_matches_transformers_generate_with_left_padding(name):
    cfg = PARITY[name]
    params = random_params(cfg, seed=21)
    model = torch_model(cfg, params)
    rng = np.random.default_rng(7)
    # lengths straddle Mistral's window of 5 so the window cuts into prompt and generated keys
    rows = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (11, 7, 4)]
    tokens, mask = left_padded(rows)
    n = 10
    want = hf_generate(model, tokens, mask, n, eos=cfg.eos_token_id)
    got = np.asarray(generate(cfg, params, tokens, mask, max_new_tokens=n,
                              eos_token_id=cfg.eos_token_id, pad_token_id=PAD))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and got.shape == (3, n)
    assert any(len(set(row)) > 1 for row in got)  # random weights, yet not a constant stream


# ------------------------------------------------------------------------------ layer paths
# One prompt shape for the path tests, so they share compilations.
CFG = FAMILIES["llama_gqa_untied"]
N_NEW = 8


@pytest.fixture(scope="module")
def models():
    return random_params(CFG, seed=31), random_params(CFG, seed=32)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(8)
    return left_padded([rng.integers(3, CFG.vocab_size, k).tolist() for k in (9, 5)])


def test_generate_path_matches_naive_forward_loop(models, prompt):
    pool, shell = build_pool(models, names=["a", "b"]), shell_of(models[1])
    tokens, mask = prompt
    # cross-model, a repeated layer (two cache entries for one pool layer), a skip, reordering
    path = pool.path([("b", 2), ("a", 0), None, ("a", 0), ("b", 1), ("a", 2)])
    got = np.asarray(generate_path(CFG, shell, pool, path, tokens, mask, max_new_tokens=N_NEW))
    want = naive_greedy(lambda t, m: forward_path(CFG, shell, pool, path, t, m), tokens, mask,
                        N_NEW)
    np.testing.assert_array_equal(got, want)
    # vmapped over candidate paths: each batch entry is its own network
    other = np.asarray([0, 1, 2, -1, 3, 4], np.int32)
    batched = jax.vmap(lambda p: generate_path(CFG, shell, pool, p, tokens, mask,
                                               max_new_tokens=N_NEW))(jnp.asarray([path, other]))
    np.testing.assert_array_equal(np.asarray(batched[0]), got)
    np.testing.assert_array_equal(
        np.asarray(batched[1]),
        np.asarray(generate_path(CFG, shell, pool, other, tokens, mask, max_new_tokens=N_NEW)))


def test_identity_path_is_generate(models, prompt):
    a, _ = models
    tokens, mask = prompt
    np.testing.assert_array_equal(
        np.asarray(generate(CFG, a, tokens, mask, max_new_tokens=N_NEW)),
        np.asarray(generate_path(CFG, shell_of(a), build_pool([a]), np.arange(3), tokens, mask,
                                 max_new_tokens=N_NEW)))


def test_eos_stops_rows_and_pads_after(models, prompt):
    a, _ = models
    tokens, mask = prompt
    free = np.asarray(generate(CFG, a, tokens, mask, max_new_tokens=N_NEW))
    # A stop token per row: a value first seen at column <= 2 (row 0) or <= 4 (row 1), so both
    # rows stop before the last column whatever the (per-process random) weights produce.
    eos = tuple(int(free[r, max(c for c in range(target + 1) if free[r, c] not in free[r, :c])])
                for r, target in ((0, 2), (1, 4)))
    first = [min(c for c in range(N_NEW) if free[r, c] in eos) for r in range(2)]
    want = free.copy()
    for r, c in enumerate(first):
        want[r, c + 1:] = PAD
    got = generate(CFG, a, tokens, mask, max_new_tokens=N_NEW, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(got), want)
    # the loop itself ended once every row had stopped (same static arguments: no new compile)
    _, steps = _generate(CFG, shell_of(a), a["layers"], jnp.arange(3, dtype=jnp.int32),
                         jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                         max_new_tokens=N_NEW, eos=eos, pad=PAD)
    assert int(steps) == max(first) + 1 < N_NEW


def test_no_retrace_across_prompt_values_and_paths(models, monkeypatch):
    import importlib

    gen = importlib.import_module("hm3jax.models.generation")

    traces = []
    rope = gen.rope_tables
    monkeypatch.setattr(gen, "rope_tables", lambda *a: traces.append(1) or rope(*a))  # runs when traced
    pool, shell = build_pool(models), shell_of(models[0])
    rng = np.random.default_rng(11)
    counts = []
    for _ in range(3):
        tokens = rng.integers(0, CFG.vocab_size, (2, 7))  # shapes no other test uses: a fresh trace
        mask = np.ones_like(tokens)
        mask[1, :rng.integers(0, 4)] = 0
        path = rng.integers(-1, pool.size, 4)
        generate_path(CFG, shell, pool, path, tokens, mask, max_new_tokens=5, eos_token_id=2)
        counts.append(len(traces))
    assert counts[0] > 0 and counts[1] == counts[2] == counts[0]


def test_clear_errors(models):
    pool, shell = build_pool(models), shell_of(models[0])
    tokens = np.ones((1, 4), np.int64)
    with pytest.raises(PoolError, match="outside the pool"):
        generate_path(CFG, shell, pool, [0, 6], tokens)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 2048"):
        generate_path(CFG, shell, pool, [0], tokens, max_new_tokens=2045)
    with pytest.raises(ValueError, match=r"left-padded: rows \[0\]"):
        generate_path(CFG, shell, pool, [0], tokens, np.asarray([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match=r"0\.\.96"):
        generate_path(CFG, shell, pool, [0], tokens * 97)


# SmolLM2 against transformers' generate: tests/test_real_weights.py (the model loaded once).
