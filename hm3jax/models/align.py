"""Affine maps applied to the hidden state where a layer path switches models (HM3's alignment).

When a path moves from a layer of model a to a layer of model b, the hidden state it hands over
follows a's statistics, not the ones b's layer was trained on. `Alignment` holds a small MLP that
gives, for each switch, an affine map h -> h * (1 + s) + c + (h V) U^T (a per-dimension scale, a
shift and a rank-r correction) from learned embeddings of (source model kind, target model kind,
target layer, path position). `forward_path(..., align=alignment)` applies it before every layer
whose model kind differs from the previous layer's (the shell's kind before the first layer); a
path that never switches runs unchanged. The MLP's output layer starts at zero, so fresh maps are
the identity. Fitting them (the CORAL-style loss) lives in `hm3jax.search.align`. Generation
(`generate_path`) and exported checkpoints run paths without maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Alignment:
    """Alignment maps for one layer pool.

    Attributes:
      params: the map MLP's parameters (see `init_align_params`).
      kind: int32 [P], the model kind of each pool entry (models that share a kind, such as the
        merged models of several preferences, share maps).
      layer: int32 [P], the layer index of each pool entry inside its model.
      shell_kind: int32 scalar, the kind of the model whose embeddings start the path.
    """

    params: dict
    kind: jax.Array
    layer: jax.Array
    shell_kind: jax.Array


def init_align_params(key: jax.Array, hidden_size: int, num_kinds: int, num_layers: int, max_steps: int,
                      rank: int = 4, embed: int = 16, width: int = 64) -> dict:
    """Parameters of the map MLP: embeddings of kinds, layers and positions, one hidden layer, and a
    zero output layer (identity maps) of width 2·D + 2·D·rank."""
    ks = jax.random.split(key, 4)
    e = lambda k, n: 0.1 * jax.random.normal(k, (n, embed), jnp.float32)
    d_in = 4 * embed
    return {
        "kind": e(ks[0], num_kinds),
        "layer": e(ks[1], num_layers),
        "position": e(ks[2], max_steps),
        "w1": jax.random.normal(ks[3], (d_in, width), jnp.float32) / jnp.sqrt(d_in),
        "b1": jnp.zeros((width,), jnp.float32),
        "w2": jnp.zeros((width, 2 * hidden_size * (1 + rank)), jnp.float32),
        "b2": jnp.zeros((2 * hidden_size * (1 + rank),), jnp.float32),
    }


def map_vector(params: dict, src_kind, dst_kind, layer, position) -> jax.Array:
    """The MLP's output [2·D·(1 + r)] for the map entering `layer` of `dst_kind` from `src_kind` at
    path step `position` (indices are clipped into the embedding tables)."""
    def row(table, i):
        return table[jnp.clip(i, 0, table.shape[0] - 1)]

    x = jnp.concatenate([row(params["kind"], src_kind), row(params["kind"], dst_kind),
                         row(params["layer"], layer), row(params["position"], position)])
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def apply_map(params: dict, hidden_size: int, h: jax.Array, src_kind, dst_kind, layer, position) -> jax.Array:
    """h [..., D] through the map entering `layer` of `dst_kind` from `src_kind` at step `position`."""
    out = map_vector(params, src_kind, dst_kind, layer, position)
    D = hidden_size
    r = out.shape[0] // (2 * D) - 1
    scale, shift = out[:D], out[D:2 * D]
    U = out[2 * D:2 * D + D * r].reshape(D, r)
    V = out[2 * D + D * r:].reshape(D, r)
    x = h.astype(jnp.float32)
    y = x * (1.0 + scale) + shift + (x @ V) @ U.T
    return y.astype(h.dtype)


def switch_step(align: Alignment | None, hidden_size: int, h: jax.Array, prev_kind, idx, t):
    """One scan step's map: (h, kind after the step). Applies the map when pool entry `idx` (>= 0)
    has a kind other than `prev_kind`; a skipped step (idx < 0) keeps both."""
    if align is None:
        return h, prev_kind
    i = jnp.maximum(idx, 0)
    kind, layer = align.kind[i], align.layer[i]
    switch = (idx >= 0) & (kind != prev_kind)
    mapped = apply_map(align.params, hidden_size, h, prev_kind, kind, layer, t)
    return jnp.where(switch, mapped, h), jnp.where(idx >= 0, kind, prev_kind)
