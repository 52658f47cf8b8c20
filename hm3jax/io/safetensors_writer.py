"""Safetensors checkpoints written shard by shard: every shard's header is laid out up front, so
tensors can be written in any order, one at a time (the reading side is safetensors_io.py)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from hm3jax.io.errors import CheckpointError, short_list
from hm3jax.io.safetensors_io import INDEX_FILE, SINGLE_FILE, dtype_code, parse_size, to_numpy_dtype


class ShardedWriter:
    """Write a safetensors checkpoint tensor by tensor, in any order, holding one tensor at a time.

    Args:
      out_dir: directory to write into (created if missing).
      specs: ordered mapping name -> (shape, dtype) of every tensor that will be written.
      max_shard_size: bytes per shard (int or a string like "5GB"); a tensor larger than this gets a
        shard of its own. One shard is named `model.safetensors`; several are named
        `model-00001-of-0000N.safetensors` and listed in `model.safetensors.index.json`.

    Every shard's header is written, and the file sized, at construction. `write(name, array)` puts
    the bytes at their offset; `close()` checks that every tensor was written and writes the index.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], Any]],
                 max_shard_size: int | str = 5 * 2**30):
        self.out_dir = os.fspath(out_dir)
        limit = parse_size(max_shard_size)
        self._specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name, (shape, dtype) in specs.items():
            shape = tuple(int(d) for d in shape)
            dt = to_numpy_dtype(dtype)
            dtype_code(dt)  # fail now on dtypes safetensors cannot hold
            self._specs[name] = (shape, dt)

        groups: list[list[str]] = [[]]
        used = 0
        for name, (shape, dt) in self._specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if groups[-1] and used + nbytes > limit:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += nbytes
        n = len(groups)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

        os.makedirs(self.out_dir, exist_ok=True)
        # A leftover index or shard from another save would be read in place of (or mixed with) ours.
        stale = [f for f in os.listdir(self.out_dir) if f.endswith(".safetensors") or f == INDEX_FILE]
        if stale:
            raise CheckpointError(f"{self.out_dir} already holds safetensors files ({', '.join(sorted(stale))}); "
                                  "write into an empty directory")
        self._loc: dict[str, tuple[str, int]] = {}  # name -> (file, absolute byte offset)
        self._written: set[str] = set()
        self._closed = False
        for fname, group in zip(self.files, groups):
            self._layout_shard(os.path.join(self.out_dir, fname), group)

    def _layout_shard(self, path: str, names: list[str]) -> None:
        # Contiguous data (the format allows no gaps), largest itemsize first so each tensor starts
        # aligned to its own itemsize; the header is space-padded so the data starts at a multiple of 8.
        order = sorted(names, key=lambda k: -self._specs[k][1].itemsize)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            shape, dt = self._specs[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": dtype_code(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(start + offset)
        for name in order:
            self._loc[name] = (path, start + header[name]["data_offsets"][0])

    def shard_of(self, name: str) -> str:
        """File name (inside out_dir) that tensor `name` goes to."""
        return os.path.basename(self._loc[name][0])

    def write(self, name: str, array: Any) -> None:
        """Write tensor `name`; `array` (numpy or jax) must have exactly the declared shape and dtype."""
        if self._closed:
            raise CheckpointError(f"{self.out_dir}: writer is closed; cannot write tensor {name!r}")
        if name not in self._specs:
            raise CheckpointError(f"tensor {name!r} was not declared to this writer ({self.out_dir})")
        if name in self._written:
            raise CheckpointError(f"tensor {name!r} was already written to {self.out_dir}")
        shape, dt = self._specs[name]
        arr = np.asarray(array)
        if arr.shape != shape or arr.dtype != dt:
            raise CheckpointError(
                f"tensor {name!r}: declared {list(shape)} {dt}, got {list(arr.shape)} {arr.dtype}")
        path, offset = self._loc[name]
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self._written.add(name)

    def close(self) -> None:
        """Check that every declared tensor was written; write the index when there are several shards."""
        if self._closed:
            return
        missing = [k for k in self._specs if k not in self._written]
        if missing:
            raise CheckpointError(
                f"{self.out_dir}: {len(missing)} declared tensor(s) never written: {short_list(missing)}")
        self._closed = True
        if len(self.files) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * dt.itemsize for s, dt in self._specs.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: self.shard_of(k) for k in self._specs}}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
