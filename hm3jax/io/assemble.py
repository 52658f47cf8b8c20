"""Checked conversion between per-tensor HF names and the stacked params pytree (models/params.py).

A *source* is anything with `names`, `shape(name)`, `dtype(name)` and `get(name) -> np.ndarray`
(CheckpointReader, the GGUF and pickle readers). Every check runs on names and shapes before any
tensor data is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hm3jax.io.errors import CheckpointError, short_list
from hm3jax.models.config import ModelConfig
from hm3jax.models.params import hf_name, hf_names, iter_leaves, param_shapes, set_path

# Buffers some checkpoints carry that are recomputed from the config, never learned.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _span(layers: set[int]) -> str:
    return f"0..{max(layers)}" if layers else "none"


class TensorSource(Protocol):
    names: Sequence[str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def get(self, name: str) -> np.ndarray: ...


def float_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """A floating numpy dtype from a name ("bfloat16"), numpy or jax dtype; error on anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"{what} {dtype!r} is not supported; use one of "
                         f"{', '.join(d.name for d in FLOAT_DTYPES)}")
    return dt


def hf_order(cfg: ModelConfig) -> list[str]:
    """HF tensor names in file order: embeddings, layers 0..L-1, final norm, head."""
    names = list(hf_names(cfg))
    rank = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 2, "lm_head": 3}

    def key(n: str) -> tuple:
        m = re.match(r"^model\.layers\.(\d+)\.", n)
        return (1, int(m.group(1))) if m else (rank[n.rsplit(".", 1)[0]], 0)

    return sorted(names, key=key)  # stable: keeps each layer's tensors in params.py order


def params_from_source(cfg: ModelConfig, source: TensorSource, dtype: Any = None,
                       where: str = "checkpoint") -> dict:
    """Read every tensor of `cfg` from `source` into the stacked params pytree of jax arrays.

    Args:
      cfg: the architecture; decides which tensors are expected and their shapes.
      source: per-tensor reader keyed by HF names.
      dtype: cast every leaf to this float dtype; None keeps each tensor's stored dtype.
      where: the file or directory, for error messages.

    Raises CheckpointError listing missing/unexpected tensors, wrong shapes, or a stored `lm_head`
    that differs from the embedding of a tied model.
    """
    out_dt = None if dtype is None else float_dtype(dtype)
    expected = check_source(cfg, source, where)
    shapes = param_shapes(cfg)
    by_path: dict[tuple, list[tuple[int | None, str]]] = {}
    for name, (path, layer) in expected.items():
        by_path.setdefault(path, []).append((layer, name))
    params: dict = {}
    for path, entries in by_path.items():
        if entries[0][0] is None:
            arr = np.asarray(source.get(entries[0][1]))
            leaf = arr if out_dt is None or arr.dtype == out_dt else arr.astype(out_dt)
        else:
            # Fill a preallocated stack so at most one layer's tensor is in flight beside it.
            dt = out_dt or np.dtype(source.dtype(entries[0][1]))
            leaf = np.empty(shapes[path], dt)
            for layer, name in entries:
                leaf[layer] = source.get(name)
        set_path(params, path, jnp.asarray(leaf))
        del leaf
    return params


def check_source(cfg: ModelConfig, source: TensorSource, where: str = "checkpoint") -> dict:
    """Check `source` against `cfg` from names, dtypes and shapes (plus, for a tied model that stores
    a head, that it equals the embedding); return `hf_names(cfg)`. Raises CheckpointError as
    `params_from_source` documents. Reads no tensor data otherwise."""
    present = list(source.names)
    # Before enumerating the expected names: a corrupt layer count (a flipped bit can declare 33
    # million layers) would otherwise build hundreds of millions of names.
    layers = {int(m.group(1)) for m in map(_LAYER_RE.match, present) if m}
    if cfg.num_hidden_layers > len(present):
        raise CheckpointError(f"{where}: the layer count (num_hidden_layers; llama.block_count in GGUF) is "
                              f"{cfg.num_hidden_layers}, but the checkpoint holds only {len(present)} tensors "
                              f"(layers {_span(layers)})")
    expected = hf_names(cfg)
    present_set = set(present)
    tied_head = cfg.tie_word_embeddings and HEAD in present
    missing = [n for n in hf_order(cfg) if n not in present_set]
    unexpected = [n for n in present
                  if n not in expected and not _IGNORED.search(n) and not (tied_head and n == HEAD)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match {cfg.model_type} config "
                              f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); "
                              + _mismatch(missing, unexpected))

    shard_of = getattr(source, "shard_of", None)
    for name in expected:
        dt = np.dtype(source.dtype(name))
        if dt not in FLOAT_DTYPES:
            file = shard_of(name) if shard_of is not None else where
            raise CheckpointError(f"{file}: tensor {name}: dtype {dt.name} in the file; expected a float dtype "
                                  f"({', '.join(d.name for d in FLOAT_DTYPES)}) for model weights")

    shapes = param_shapes(cfg)
    bad = []
    for name, (path, layer) in expected.items():
        want = shapes[path][1:] if layer is not None else shapes[path]
        got = tuple(source.shape(name))
        if got != want:
            bad.append(f"{name}: expected {list(want)}, found {list(got)}")
    if tied_head and tuple(source.shape(HEAD)) != shapes[("embed_tokens", "weight")]:
        bad.append(f"{HEAD}: expected {list(shapes[('embed_tokens', 'weight')])} (tied to the "
                   f"embedding), found {list(source.shape(HEAD))}")
    if bad:
        raise CheckpointError(f"{where}: wrong tensor shapes: " + "; ".join(bad[:20])
                              + (f"; ... ({len(bad) - 20} more)" if len(bad) > 20 else ""))

    if tied_head and not np.array_equal(source.get(HEAD), source.get(EMBED)):
        raise CheckpointError(
            f"{where}: config has tie_word_embeddings=true but {HEAD} differs from {EMBED}; "
            "set tie_word_embeddings=false in config.json to keep a separate head")
    return expected


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of `param_shapes(cfg)`."""
    shapes = param_shapes(cfg)

    def label(path: tuple) -> str:
        return ("model.layers.*." + ".".join(path[1:]) if path[0] == "layers" else hf_name(path)) \
            + f" (params[{']['.join(repr(k) for k in path)}])"

    if not isinstance(params, dict):
        raise CheckpointError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    leaves = dict(iter_leaves(params))
    missing = [label(p) for p in shapes if p not in leaves]
    unexpected = [label(p) for p in leaves if p not in shapes]
    if missing or unexpected:
        raise CheckpointError(f"params do not match the {cfg.model_type} config: "
                              + _mismatch(missing, unexpected))
    for path, want in shapes.items():
        leaf = leaves[path]
        got = tuple(getattr(leaf, "shape", ()))
        if got != want:
            raise CheckpointError(f"{label(path)}: expected shape {list(want)}, found {list(got)}")
        dt = getattr(leaf, "dtype", None)
        if dt is None or np.dtype(dt) not in FLOAT_DTYPES:
            raise CheckpointError(f"{label(path)}: dtype {dt} is not a float dtype "
                                  f"({', '.join(d.name for d in FLOAT_DTYPES)})")


def _mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'missing N: a, b; unexpected M: c' (only the non-empty parts)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {short_list(unexpected)}")
    return "; ".join(parts)
