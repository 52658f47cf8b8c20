"""Checkpoints straight into and out of sharded arrays, one tensor (slice) at a time.

`load_sharded` builds every params leaf with `jax.make_array_from_callback`: each device's callback
reads only its own slice, layer by layer, from the memory-mapped safetensors shards, so no host
ever holds a whole model (nor a whole stacked leaf): the largest host buffer is one device's slice
of one leaf. `save_sharded` writes an HF directory from sharded params: process 0 gathers one
tensor at a time (every process takes part in each gather; only process 0 writes).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hm3jax.io.assemble import check_source, float_dtype
from hm3jax.io.errors import CheckpointError, CheckpointNotFoundError
from hm3jax.io.hf import has_safetensors, read_config, save_pretrained
from hm3jax.io.safetensors_io import CONFIG_FILE, CheckpointReader
from hm3jax.models.config import ModelConfig
from hm3jax.models.params import get_path, hf_names, param_shapes, set_path
from hm3jax.sharding import param_shardings


def _slice_reader(reader: CheckpointReader, entries: list[tuple[int | None, str]], shape: tuple,
                  out_dt: np.dtype | None, stats: dict | None):
    """The callback of one leaf: index (a tuple of slices of the global shape) -> that slice."""
    by_layer = {layer: name for layer, name in entries}

    def read(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if None in by_layer:  # a shell tensor: read the slice of its memory map
            part = np.array(reader.get(by_layer[None])[index])
        else:
            layers = range(shape[0])[index[0]]
            first = reader.get(by_layer[layers[0]])[index[1:]]
            part = np.empty((len(layers),) + first.shape, out_dt or first.dtype)
            for j, layer in enumerate(layers):
                part[j] = reader.get(by_layer[layer])[index[1:]]
        if out_dt is not None and part.dtype != out_dt:
            part = part.astype(out_dt)
        if stats is not None:
            stats["largest_host_buffer"] = max(stats.get("largest_host_buffer", 0), part.nbytes)
        return part

    return read


def load_sharded(path: str | os.PathLike, mesh: Mesh, dtype: Any = None, shardings: Any = None,
                 mesh_cfg=None, stats: dict | None = None) -> tuple[ModelConfig, dict]:
    """Load an HF safetensors directory as (ModelConfig, params of sharded jax arrays).

    Args:
      path: HF checkpoint directory (config.json + safetensors, single file or sharded with index).
      mesh: the device mesh (hm3jax.sharding.make_mesh).
      dtype: cast to this float dtype; None keeps the stored dtype.
      shardings: a NamedSharding per params leaf; default `sharding.param_shardings` (the rules).
      mesh_cfg: MeshConfig whose rule overrides apply to the default shardings.
      stats: optional dict; receives "largest_host_buffer" (bytes of the largest slice read).
    Same checks and errors as `load_pretrained` (names, dtypes, shapes before any data is read).
    Multi-host: every process calls it; each reads only the slices of its own devices.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(f"{path}: no {CONFIG_FILE} (expected an HF checkpoint directory)", cfg_path)
    if not has_safetensors(path):
        raise CheckpointNotFoundError(f"{path}: no safetensors weights (load_sharded reads safetensors only; "
                                      "convert pickles or GGUF with load_pretrained + save_pretrained)", path)
    cfg = read_config(cfg_path)
    out_dt = None if dtype is None else float_dtype(dtype)
    shapes = param_shapes(cfg)
    with CheckpointReader(path) as reader:
        expected = check_source(cfg, reader, path)
        by_path: dict[tuple, list[tuple[int | None, str]]] = {}
        for name, (p, layer) in expected.items():
            by_path.setdefault(p, []).append((layer, name))
        abstract: dict = {}
        for p in by_path:
            dt = out_dt or np.dtype(reader.dtype(by_path[p][0][1]))
            set_path(abstract, p, jax.ShapeDtypeStruct(shapes[p], dt))
        if shardings is None:
            shardings = param_shardings(abstract, mesh, mesh_cfg)
        params: dict = {}
        for p, entries in by_path.items():
            sh = shardings
            for k in p:
                sh = sh[k]
            cb = _slice_reader(reader, entries, shapes[p], out_dt, stats)
            set_path(params, p, jax.make_array_from_callback(shapes[p], sh, cb))
    dt_name = np.dtype(params["embed_tokens"]["weight"].dtype).name
    return cfg.replace(torch_dtype=dt_name), params


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of `x` on this host: a plain copy when every shard is local, else an allgather
    across processes (every process must call it, in the same order)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _GatheredLeaf:
    """A sharded leaf as save_pretrained reads it: shape, dtype, one layer (or all) gathered on use."""

    def __init__(self, a: jax.Array):
        self.a, self.shape, self.dtype = a, a.shape, a.dtype

    def __getitem__(self, layer):
        return host_array(self.a[layer])

    def __array__(self, dtype=None, copy=None):
        x = host_array(self.a)
        return x if dtype is None else x.astype(dtype)


def save_sharded(out_dir: str | os.PathLike, cfg: ModelConfig, params: dict, **kwargs) -> str | None:
    """`save_pretrained` for params of sharded (possibly multi-host) arrays: each tensor is gathered
    on its own (one layer of a stacked leaf at a time), so the writer never holds more than one
    tensor beyond what it is writing. Every process must call it; process 0 writes and returns the
    directory, the others take part in the gathers and return None. kwargs: save_pretrained's."""
    if not isinstance(params, dict):
        raise CheckpointError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    if jax.process_index() == 0:
        wrapped = jax.tree.map(_GatheredLeaf, params)
        return save_pretrained(out_dir, cfg, wrapped, **kwargs)
    for _, (p, layer) in hf_names(cfg).items():  # the same gathers, in save_pretrained's order
        leaf = get_path(params, p)
        host_array(leaf if layer is None else leaf[layer])
    return None
