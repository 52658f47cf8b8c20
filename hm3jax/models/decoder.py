"""The decoder forward pass: one `lax.scan` over a path of layer indices into a pool.

`forward` is `forward_path` on the identity path over the model's own layers, so the plain model and
every architecture-space candidate share one code path. The scan gathers `pool[path[t]]` at each
step; a candidate model is never materialised, and vmapping over a batch of paths costs one layer
slice per candidate per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hm3jax.models.align import Alignment, switch_step
from hm3jax.models.config import ModelConfig
from hm3jax.models.layers import DecoderLayer, rms_norm, rope_tables
from hm3jax.models.pool import LayerPool, shell_of


@functools.lru_cache(maxsize=64)
def _layer_graphdef(cfg: ModelConfig):
    """NNX graph definition of one layer (static; the weights come from the params pytree)."""
    abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) projections, unit norms) in the pytree layout of params.py."""
    k_layers, k_embed, k_head = jax.random.split(key, 3)

    def one_layer(k):
        return nnx.to_pure_dict(nnx.state(DecoderLayer(cfg, dtype=dtype, rngs=nnx.Rngs(k))))

    layers = jax.vmap(one_layer)(jax.random.split(k_layers, cfg.num_hidden_layers))
    embed = 0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    params = {
        "embed_tokens": {"weight": embed.astype(dtype)},
        "layers": layers,
        "norm": {"weight": jnp.ones((cfg.hidden_size,), dtype)},
    }
    if not cfg.tie_word_embeddings:
        head = 0.02 * jax.random.normal(k_head, (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        params["lm_head"] = {"weight": head.astype(dtype)}
    return params


def causal_mask(cfg: ModelConfig, key_mask: jax.Array, q_slots: jax.Array | None = None) -> jax.Array:
    """bool [B, 1, 1, S, T] (True = may attend): causal, Mistral's sliding window if set, keys where
    `key_mask` [B, T] is 0 masked. q_slots: int [S], the key slot of each query (default: 0..T-1,
    a full sequence); causality and the window are measured in slots."""
    T = key_mask.shape[-1]
    q = (jnp.arange(T) if q_slots is None else q_slots)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = k <= q
    if cfg.sliding_window is not None:
        allowed &= (q - k) < cfg.sliding_window
    return allowed[None, None, None] & key_mask.astype(bool)[:, None, None, None, :]


def embed(shell: dict, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, S, D] of int tokens [B, S]."""
    return jnp.take(shell["embed_tokens"]["weight"], tokens, axis=0)


def head(cfg: ModelConfig, shell: dict, h: jax.Array) -> jax.Array:
    """float32 logits [..., V] of hidden states [..., D]: the final norm, then the (tied) head."""
    h = rms_norm(h, shell["norm"]["weight"], cfg.rms_norm_eps)
    w = shell["lm_head"]["weight"] if "lm_head" in shell else shell["embed_tokens"]["weight"]
    return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)


def pool_layer(cfg: ModelConfig, layers: dict, idx: jax.Array) -> DecoderLayer:
    """The layer at pool index `idx` (a negative index gives layer 0; callers skip it), as a module."""
    return nnx.merge(_layer_graphdef(cfg), jax.tree.map(lambda a: a[jnp.maximum(idx, 0)], layers))


def forward_path(cfg: ModelConfig, shell: dict, pool: LayerPool, path: jax.Array,
                 tokens: jax.Array, attention_mask: jax.Array | None = None,
                 align: Alignment | None = None) -> jax.Array:
    """Run the layers `pool[path[0]], pool[path[1]], ...` between `shell`'s embeddings and head.

    Args:
      cfg: config giving the attention layout, RoPE and norms (shared by every pool layer).
      shell: {"embed_tokens", "norm", optional "lm_head"} of one model (see `shell_of`).
      pool: LayerPool (or a params pytree's `layers` wrapped by `build_pool`).
      path: int [T] pool indices; -1 skips the step. Any T; jit compiles once per T.
      tokens: int [B, S].
      attention_mask: optional 0/1 [B, S]; positions count only unmasked tokens, so left padding
        gives the same positions as unpadded input.
      align: optional maps applied where the path switches models (models.align); None runs the
        layers as they are.
    Returns:
      float32 logits [B, S, vocab].
    """
    return forward_layers(cfg, shell, pool.layers, checked_path(pool, path), tokens, attention_mask, align)


def checked_path(pool: LayerPool, path) -> jax.Array:
    """`path` as int32 [T]: ValueError unless 1-D, PoolError for an index outside the pool (checked
    when the path is concrete; a traced path, vmapped over candidates, cannot be)."""
    path = jnp.asarray(path, jnp.int32)
    if path.ndim != 1:
        raise ValueError(f"path must be a 1-D array of pool indices, got shape {path.shape}")
    concrete = concrete_or_none(path)
    if concrete is not None:
        pool.check_path(concrete)
    return path


def concrete_or_none(x) -> np.ndarray | None:
    """x as numpy, or None under a jax transformation (where values cannot be checked)."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def run_layers(cfg: ModelConfig, layers: dict, path: jax.Array, h: jax.Array, attention_mask: jax.Array,
               align: Alignment | None = None, tap=None):
    """The layers of `path` (pool indices, -1 skips) over hidden states h [B, S, D] as one lax.scan.

    align: optional switch maps (models.align). tap: optional f(h_in, h_mapped, idx, switched) called
    inside each step, whose outputs are stacked over the steps and returned as the second value
    (search.align fits the maps through it). With a tap, the state entering each step is cut from
    autodiff, so a tap output differentiates through its own step's map only.
    Returns (h, stacked tap outputs or None).
    """
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    cos, sin = rope_tables(cfg, positions)
    mask = causal_mask(cfg, attention_mask)
    if not path.shape[0]:  # an empty pool (zero-layer model) cannot even be indexed
        return h, None

    def step(carry, x):
        h, prev = carry
        idx, t = x
        if tap is not None:
            h = jax.lax.stop_gradient(h)
        mapped, kind = switch_step(align, cfg.hidden_size, h, prev, idx, t)
        out = pool_layer(cfg, layers, idx)(mapped, cos, sin, mask)
        tapped = None if tap is None else tap(h, mapped, idx, kind != prev)
        return (jnp.where(idx >= 0, out, h), kind), tapped

    start = jnp.int32(-1) if align is None else jnp.asarray(align.shell_kind, jnp.int32)
    (h, _), tapped = jax.lax.scan(step, (h, start), (path, jnp.arange(path.shape[0], dtype=jnp.int32)))
    return h, tapped


@functools.partial(jax.jit, static_argnums=0)
def forward_layers(cfg, shell, layers, path, tokens, attention_mask, align=None):
    """forward_path over raw stacked layers [P, ...] (a LayerPool's `layers`) with the path used as
    given, unchecked (jitted; for callers that hold the layers themselves, e.g. sharded scoring)."""
    B, S = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, S), jnp.int32)
    h, _ = run_layers(cfg, layers, path, embed(shell, tokens), attention_mask, align)
    return head(cfg, shell, h)


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits of the plain model: float32 [B, S, vocab] for int tokens [B, S].

    Runs the identity path over the model's own layers through `forward_path`.
    """
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    return forward_layers(cfg, shell_of(params), params["layers"], jnp.arange(n_layers, dtype=jnp.int32),
                         tokens, attention_mask)
