"""Greedy generation with a KV cache: one prefill pass over the prompt, then a `lax.while_loop`.

`generate` is `generate_path` on the identity path over the model's own layers, as `forward` is
`forward_path`. The cache holds keys and values per *path step* ([T, B, S_max, Hkv, hd]), not per
pool layer, because a path may run the same pool layer at several steps and each step attends over
its own inputs. Everything after argument checks runs in one jitted function, compiled once per
(batch, prompt length, max_new_tokens, path length): the decode loop is a `lax.while_loop` that
ends when every row has emitted an EOS token or `max_new_tokens` tokens exist.

Cache slots are buffer columns: slot s holds the prompt's column s for s < P and generated token
s - P after it. Causality and Mistral's sliding window are measured in slots, as the full-sequence
mask of `forward` measures them in columns; RoPE positions count only real tokens
(cumsum(mask) - 1), so left-padded prompts generate what their unpadded versions would.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.models.config import ModelConfig
from hm3jax.models.decoder import causal_mask, checked_path, concrete_or_none, embed, head, pool_layer
from hm3jax.models.layers import rope_tables
from hm3jax.models.pool import LayerPool, shell_of


class KVCache(NamedTuple):
    """Keys and values of every path step: k, v of shape [T, B, S_max, Hkv, hd]."""

    k: jax.Array
    v: jax.Array


class _DecodeState(NamedTuple):
    step: jax.Array    # int32 []: tokens emitted so far (the next one goes to column `step`)
    tokens: jax.Array  # int32 [B, N]: emitted tokens, pad where nothing was emitted yet
    last: jax.Array    # int32 [B]: the token emitted at step - 1, fed to the model next
    done: jax.Array    # bool [B]: the row has emitted an EOS token
    cache: KVCache


def generate(cfg: ModelConfig, params: dict, prompt_tokens, prompt_mask=None,
             max_new_tokens: int = 32, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0) -> jax.Array:
    """Greedy continuation of a batch of prompts by the plain model.

    Args:
      cfg: the model's config.
      params: params pytree (params.py layout).
      prompt_tokens: int [B, P]; rows of different lengths are left-padded.
      prompt_mask: optional 0/1 [B, P], 1 on real tokens; every row must end in a real token.
      max_new_tokens: N >= 1, the number of tokens to produce per row.
      eos_token_id: an id or ids that end a row; None never stops early (pass cfg.eos_token_id
        to stop at the model's EOS).
      pad_token_id: emitted by a row after its EOS token.
    Returns:
      int32 [B, N]: the generated tokens (EOS included), pad after a row's EOS.
    """
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    return _generate_layers(cfg, shell_of(params), params["layers"],
                            jnp.arange(n_layers, dtype=jnp.int32), prompt_tokens, prompt_mask,
                            max_new_tokens, eos_token_id, pad_token_id)


def generate_path(cfg: ModelConfig, shell: dict, pool: LayerPool, path, prompt_tokens,
                  prompt_mask=None, max_new_tokens: int = 32,
                  eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int = 0) -> jax.Array:
    """Greedy continuation by the network `pool[path[0]], pool[path[1]], ...` inside `shell`.

    Args:
      cfg: config giving the attention layout, RoPE and norms (shared by every pool layer).
      shell: {"embed_tokens", "norm", optional "lm_head"} of one model (see `shell_of`).
      pool: LayerPool holding the layers.
      path: int [T] pool indices; -1 skips the step.
      prompt_tokens, prompt_mask, max_new_tokens, eos_token_id, pad_token_id: as for `generate`.
    Returns:
      int32 [B, N] generated tokens, pad after a row's EOS.
    """
    return _generate_layers(cfg, shell, pool.layers, checked_path(pool, path), prompt_tokens, prompt_mask,
                            max_new_tokens, eos_token_id, pad_token_id)


def _generate_layers(cfg, shell, layers, path, prompt_tokens, prompt_mask, max_new_tokens,
                     eos_token_id, pad_token_id):
    """Argument checks and normalisation shared by `generate` and `generate_path`."""
    tokens = jnp.asarray(prompt_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be int [batch, length], got {tokens.dtype} "
                         f"{tokens.shape}")
    B, P = tokens.shape
    mask = jnp.ones((B, P), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"prompt_mask has shape {mask.shape}, prompt_tokens {tokens.shape}")
    _check_prompt(cfg, concrete_or_none(tokens), concrete_or_none(mask), P, int(max_new_tokens))
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        raise ValueError("pad_token_id must be an int (it fills rows after their EOS)")
    out, _ = _generate(cfg, shell, layers, path, tokens.astype(jnp.int32), mask,
                       max_new_tokens=int(max_new_tokens), eos=eos, pad=int(pad_token_id))
    return out


def _check_prompt(cfg: ModelConfig, tokens, mask, P: int, N: int) -> None:
    if N < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {N}")
    if P < 1:
        raise ValueError("the prompt is empty; generation needs at least one prompt token")
    if cfg.max_position_embeddings < P + N:
        raise ValueError(f"prompt length {P} + max_new_tokens {N} = {P + N} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    if tokens is not None and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"prompt token ids must lie in 0..{cfg.vocab_size - 1}, got "
                         f"{tokens.min()}..{tokens.max()}")
    if mask is not None:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("prompt_mask must hold only 0 and 1")
        bad = np.flatnonzero(mask[:, -1] == 0)
        if bad.size:
            # The next token is read off the last column, so it must be a real token.
            raise ValueError(f"prompts must be left-padded: rows {bad.tolist()} of prompt_mask "
                             f"end in padding (0) in the last column")


def _run_path(cfg, shell, layers, path, tokens, positions, start, key_mask, cache):
    """Run tokens [B, S] sitting in cache slots start..start+S-1 through the path.

    Writes their keys and values into `cache` at every step and returns (float32 logits of the
    last column [B, V], the updated cache). key_mask: bool [B, S_max], False on prompt padding.
    """
    S = tokens.shape[1]
    cos, sin = rope_tables(cfg, positions)
    # Slots past the query are empty or stale; causality hides them.
    mask = causal_mask(cfg, key_mask, q_slots=start + jnp.arange(S))

    def step(carry, xs):
        h, ck, cv = carry
        t, idx = xs
        out, (kt, vt) = pool_layer(cfg, layers, idx).step(h, cos, sin, mask, (ck[t], cv[t]), start)
        # A skipped step's cache entry is written but never attended to.
        ck, cv = ck.at[t].set(kt), cv.at[t].set(vt)
        return (jnp.where(idx >= 0, out, h), ck, cv), None

    h = embed(shell, tokens)
    T = path.shape[0]
    if T:  # a zero-layer path has an empty cache that cannot be indexed
        (h, ck, cv), _ = jax.lax.scan(step, (h, cache.k, cache.v),
                                      (jnp.arange(T, dtype=jnp.int32), path))
        cache = KVCache(ck, cv)
    return head(cfg, shell, h[:, -1]), cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos", "pad"))
def _generate(cfg, shell, layers, path, prompt, prompt_mask, *, max_new_tokens, eos, pad):
    """Returns (tokens int32 [B, N], number of loop steps taken incl. the prefill's token)."""
    B, P = prompt.shape
    N, T = max_new_tokens, path.shape[0]
    # The last generated token is never fed back, so it needs no slot.
    S_max = P + N - 1
    dtype = jnp.result_type(shell["embed_tokens"]["weight"], layers["self_attn"]["k_proj"]["weight"])
    shape = (T, B, S_max, cfg.num_key_value_heads, cfg.head_dim)
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    key_mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((B, N - 1), bool)], axis=1)
    n_real = prompt_mask.sum(axis=-1)

    def is_eos(tok):
        if not eos:
            return jnp.zeros(tok.shape, bool)
        return (tok[:, None] == jnp.asarray(eos, jnp.int32)[None]).any(axis=-1)

    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    logits, cache = _run_path(cfg, shell, layers, path, prompt, positions, jnp.zeros((), jnp.int32),
                              key_mask, cache)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(first)
    state = _DecodeState(jnp.ones((), jnp.int32), tokens, first, is_eos(first), cache)

    def cond(s: _DecodeState):
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        fed = s.step - 1  # index of the generated token being fed
        logits, cache = _run_path(cfg, shell, layers, path, s.last[:, None],
                                  (n_real + fed)[:, None], P + fed, key_mask, s.cache)
        nxt = jnp.where(s.done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (jnp.zeros((), jnp.int32), s.step))
        return _DecodeState(s.step + 1, tokens, nxt, s.done | is_eos(nxt), cache)

    final = jax.lax.while_loop(cond, body, state)
    return final.tokens, final.step
