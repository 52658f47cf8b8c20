"""Flax NNX modules of one Llama-family decoder layer, plus RoPE tables.

The modules own their parameters only while being initialised; afterwards the weights live in the
plain params pytree (see `params.py`) and a module is rebuilt from a slice of it with
`nnx.merge(graphdef, layer_params)` inside jitted code (trace-time only, no runtime cost).
Attribute names are Hugging Face's, so the pure dict of a layer's state *is* the layer's slice of
the params pytree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hm3jax.models.config import ModelConfig

_INIT_STD = 0.02


class Linear(nnx.Module):
    """y = x @ W.T (+ b), W stored as [out, in] like torch/HF."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        w = _INIT_STD * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
        self.weight = nnx.Param(w.astype(dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((out_features,), dtype))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMS normalisation computed in float32, scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, H, hd]; cos/sin: [B, S, hd] (float32). Returns x rotated, in x's dtype."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + _rotate_half(x.astype(jnp.float32)) * s).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, hd)
        self.q_proj = Linear(D, self.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, self.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, self.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.num_heads * hd, D, bias=False, dtype=dtype, rngs=rngs)

    def qkv(self, x, cos, sin):
        """Rotated queries [B, S, Hkv, G, hd] and keys, values [B, S, Hkv, hd] for x: [B, S, D].

        Separate from `__call__` so a decoding loop can put k and v in a cache before attending.
        """
        B, S, _ = x.shape
        Hkv, G, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(B, S, Hkv * G, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(B, S, Hkv, hd), cos, sin)
        v = self.v_proj(x).reshape(B, S, Hkv, hd)
        return q.reshape(B, S, Hkv, G, hd), k, v

    def __call__(self, x, cos, sin, mask):
        """x: [B, S, D]; cos/sin: [B, S, hd]; mask: bool [B, 1, 1, S, S] (True = may attend)."""
        return self.o_proj(attend(*self.qkv(x, cos, sin), mask))


def attend(q, k, v, mask):
    """Grouped-query attention of q: [B, S, Hkv, G, hd] over k, v: [B, T, Hkv, hd].

    mask: bool broadcastable to [B, Hkv, G, S, T] (True = may attend). Returns [B, S, Hkv*G*hd]
    (before the output projection).

    The operands are transposed to batch-major layouts ([B, Hkv, G*S, hd] @ [B, Hkv, hd, T]) before
    the two products: XLA:CPU runs such canonical batched matmuls about twice as fast as the same
    einsum over strided operands, and the query group G folds into the rows so keys are not repeated.
    """
    B, S, Hkv, G, hd = q.shape
    T = k.shape[1]
    qt = q.transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, hd)
    kt = k.transpose(0, 2, 3, 1)  # [B, Hkv, hd, T]
    vt = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    scores = jnp.matmul(qt, kt, preferred_element_type=jnp.float32).reshape(B, Hkv, G, S, T)
    scores = scores * (1.0 / math.sqrt(hd))
    # A finite fill keeps fully masked rows (padding queries) free of NaNs.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, Hkv, G * S, T)
    out = jnp.matmul(probs, vt).reshape(B, Hkv, G, S, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, Hkv * G * hd)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(D, F, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(F, D, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm SwiGLU block, both residual."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        """x: [B, S, D] -> [B, S, D]; mask: bool [B, 1, 1, S, S] (True = may attend)."""
        return self.step(x, cos, sin, mask)[0]

    def step(self, x, cos, sin, mask, cache=None, start=None):
        """The layer, optionally over a KV cache: the one layer step of `forward` and `generate`.

        cache: None (attend over x's own keys), or (k, v) of shape [B, S_max, Hkv, hd]: x's keys
          and values are written at slots start..start+S-1 and the queries attend over all S_max
          slots (mask: bool [B, 1, 1, S, S_max]).
        Returns (output [B, S, D], the updated cache or None).
        """
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(x), cos, sin)
        if cache is not None:
            zero = jnp.zeros((), jnp.int32)
            ck, cv = cache
            # Update only the new columns in place; slots past the queries are hidden by the mask.
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, start, zero, zero))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, start, zero, zero))
            cache, k, v = (ck, cv), ck, cv
        x = x + attn.o_proj(attend(q, k, v, mask))
        return x + self.mlp(self.post_attention_layernorm(x)), cache


# ---------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [hd/2] (float32) with the config's scaling (default, linear, llama3)."""
    hd = cfg.head_dim
    # float32 throughout, as transformers computes it, so positions far out agree to the last bit.
    exponent = np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)
    inv = np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, S, hd] (float32) for integer positions [B, S]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
