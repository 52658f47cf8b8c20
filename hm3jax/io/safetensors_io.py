"""Safetensors checkpoints read as memory-mapped numpy views (writing: safetensors_writer.py).

The safetensors header is parsed here (8-byte little-endian length, then JSON) rather than through
the `safetensors` package because its numpy framework cannot return bfloat16. Reading either maps each
shard once and hands out zero-copy views (`get`), or copies one tensor into a buffer of its own
(`read`, which leaves no file pages mapped into the process); writing lays out every shard's header up
front so tensors can be written in any order, one at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import re
import struct
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from hm3jax.io.errors import CheckpointError, CheckpointNotFoundError
from hm3jax.io.paths import NotRegularFileError, model_file, open_regular

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Little-endian explicitly: the format is little-endian whatever the host is.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit; a larger value means a corrupt file
_MMAP_MIN = 2**20  # `read` buffers from this size up are anonymous maps of their own
_ANON_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a numpy/jax/ml_dtypes dtype, its name ("bfloat16"), or a safetensors code ("BF16")."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"not a dtype: {dtype!r}") from None


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype code ("F32", "BF16", ...) of a dtype."""
    dt = to_numpy_dtype(dtype)
    if dt not in _CODES:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors; supported: {', '.join(DTYPES)}")
    return _CODES[dt]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10**9) or "500MiB" (2**20), as transformers reads them."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size {size!r}: expected bytes as an int or a string like '5GB', '500MiB'")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size {size!r} must be positive")
    return n


# --------------------------------------------------------------------------------------------- reading
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of one shard.

    Validates the header's structure, dtypes and shapes, that every tensor's bytes lie inside the file
    and that no two tensors share bytes. Errors name the file, the tensor and the field, never echo
    the file's bytes.
    """
    try:
        with open_regular(path, "rb", what="safetensors file") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                # The length itself is not shown: on a file that is not safetensors it is file content.
                raise CheckpointError(f"{path}: not a safetensors file or corrupt (the 8-byte header length "
                                      f"exceeds the file's {size} bytes or the 100 MiB limit)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such safetensors file", path) from None
    except NotRegularFileError:
        raise
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8 at byte {8 + e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e.msg} at byte "
                              f"{8 + e.pos})") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object of tensors)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__: expected an object)")
    data_start = 8 + n
    spans = []
    for name, info in header.items():
        what = f"{path}: tensor {name!r:.100}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what}: expected an object with dtype, shape, data_offsets")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            shown = repr(code)[:20] if isinstance(code, str) else type(code).__name__
            raise CheckpointError(f"{what}: dtype {shown}; expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**62 for d in shape):
            raise CheckpointError(f"{what}: shape: expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{what}: data_offsets: expected [begin, end], integers with "
                                  "0 <= begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{what}: data_offsets {[begin, end]} do not fit shape {shape} {code} ({nbytes} bytes) "
                f"in a file of {size} bytes (truncated or corrupt)")
        info["shape"] = tuple(shape)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r:.100} and {b!r:.100} overlap (data_offsets share "
                                  "bytes; corrupt header)")
    return data_start, header


def _close_fds(fds: dict[str, int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.popitem()[1])


def read_json_object(path: str, expected: str) -> dict:
    """A JSON file that must hold an object; errors name the file and what was expected, never its bytes."""
    try:
        with open_regular(path, "rb", what="JSON file") as fh:
            raw = fh.read(_MAX_HEADER + 1)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file", path) from None
    except NotRegularFileError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); expected {expected}") from None
    if len(raw) > _MAX_HEADER:
        raise CheckpointError(f"{path}: larger than {_MAX_HEADER // 2**20} MiB; expected {expected}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 (at byte {e.start}); expected {expected}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at byte {e.pos}); expected {expected}") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON; expected {expected}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: JSON {type(doc).__name__}; expected {expected}")
    return doc


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of an HF safetensors checkpoint.

    `path` is a directory holding `model.safetensors`, or shards listed by
    `model.safetensors.index.json` (or, failing both, any `*.safetensors` files), or a single
    `.safetensors` file. Only headers are read up front; `get` maps a shard on first use, `read` opens
    it on first use.

    Attributes:
      names: tensor names in checkpoint order.
      config: the directory's config.json as a dict, or None when there is none.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self._maps: dict[str, np.memmap] = {}
        self._fds: dict[str, int] = {}
        # Guards _fds; `close` waits (on this condition) until no `read` is using a descriptor, so a
        # read-ahead thread never reads from a closed (or reused) file descriptor.
        self._fd_lock = threading.Condition()
        self._reading = 0
        weakref.finalize(self, _close_fds, self._fds)  # files `read` opened, when the reader goes
        if os.path.isfile(path):
            root, shard_of = os.path.dirname(path), None
            files = [path]
        elif os.path.isdir(path):
            root = path
            files, shard_of = self._find_shards(path)
        else:
            raise CheckpointNotFoundError(f"{path}: no such checkpoint file or directory", path)
        self._headers = {f: read_header(f) for f in files}
        self._where: dict[str, str] = {}
        if shard_of is not None:
            for name, f in shard_of.items():
                if name not in self._headers[f][1]:
                    raise CheckpointError(
                        f"{os.path.join(path, INDEX_FILE)}: tensor {name!r} is listed in shard "
                        f"{os.path.basename(f)} but that shard does not contain it")
                self._where[name] = f
        else:
            for f in files:
                for name in self._headers[f][1]:
                    if name in self._where:
                        raise CheckpointError(
                            f"tensor {name!r} appears in both {self._where[name]} and {f}")
                    self._where[name] = f
        self.names: list[str] = list(self._where)
        self.config: dict | None = None
        cfg_path = os.path.join(root, CONFIG_FILE)
        if os.path.isfile(cfg_path):
            self.config = read_json_object(cfg_path, "an HF config.json (a JSON object)")

    @staticmethod
    def _find_shards(root: str) -> tuple[list[str], dict[str, str] | None]:
        index = os.path.join(root, INDEX_FILE)
        if os.path.isfile(index):
            doc = read_json_object(index, "a safetensors index (a JSON object with a 'weight_map' of "
                                          "tensor name -> shard file)")
            weight_map = doc.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file, "
                                      f"got {type(weight_map).__name__}")
            shard_of = {}
            for name, shard in weight_map.items():
                where = f"{index}: weight_map[{name!r:.100}]"
                shard_of[name] = model_file(root, shard, where)
            files = list(dict.fromkeys(shard_of.values()))
            for f in files:
                if os.path.exists(f) and not os.path.isfile(f):
                    raise NotRegularFileError(f"{index} names shard {os.path.relpath(f, root)}, which is not a "
                                              "regular file (a FIFO, socket, device or directory)", f)
                if not os.path.isfile(f):
                    raise CheckpointNotFoundError(
                        f"{index} names shard {os.path.relpath(f, root)}, which does not exist in {root}", f)
            return files, shard_of
        single = os.path.join(root, SINGLE_FILE)
        if os.path.isfile(single):
            return [model_file(root, SINGLE_FILE, root)], None
        files = sorted(model_file(root, f, root) for f in os.listdir(root) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointNotFoundError(
                f"{root}: no safetensors weights (looked for {SINGLE_FILE}, {INDEX_FILE}, *.safetensors)", root)
        return files, None

    def _info(self, name: str) -> dict:
        try:
            return self._headers[self._where[name]][1][name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (from the header; no data is read)."""
        return self._info(name)["shape"]

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor `name` (bfloat16 as `ml_dtypes.bfloat16`)."""
        return DTYPES[self._info(name)["dtype"]]

    def shard_of(self, name: str) -> str:
        """Path of the file holding tensor `name`."""
        self._info(name)
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only, zero-copy view into the memory-mapped shard."""
        info = self._info(name)
        f = self._where[name]
        dt = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if begin == end:
            return np.zeros(info["shape"], dt)
        m = self._maps.get(f)
        if m is None:
            m = self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start = self._headers[f][0]
        return m[start + begin:start + end].view(dt).reshape(info["shape"])

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` copied from the file (pread) into a fresh, writable array that owns its memory.

        Unlike `get`, nothing of the file stays mapped into the process: the bytes go through the page
        cache into this array only, so once the array is dropped the process's resident memory is
        back where it was. Buffers of 1 MiB and more are anonymous page-aligned maps, handed back to
        the kernel as soon as the array is freed (not kept by malloc). Safe to call from several
        threads at once.
        """
        info = self._info(name)
        f = self._where[name]
        dt = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        n = end - begin
        if n >= _MMAP_MIN:
            # Populated at once: one call maps every page instead of one fault per page (~40% less
            # kernel time than faulting them in during the read).
            buf = np.frombuffer(mmap.mmap(-1, n, flags=_ANON_FLAGS), np.uint8)
        else:
            buf = np.empty(n, np.uint8)
        if n:
            fd = self._fd(f)
            try:
                view = memoryview(buf)
                offset = self._headers[f][0] + begin
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise CheckpointError(f"{f}: tensor {name!r} is truncated (file shrank while reading)")
                    done += got
            finally:
                with self._fd_lock:
                    self._reading -= 1
                    self._fd_lock.notify_all()
        return buf.view(dt).reshape(info["shape"])

    def _fd(self, f: str) -> int:
        """An open descriptor of shard `f`, counted as in use until the caller decrements `_reading`."""
        with self._fd_lock:
            fd = self._fds.get(f)
            if fd is None:
                with open_regular(f, "rb", what="safetensors file") as fh:  # never a FIFO swapped in
                    fd = self._fds[f] = os.dup(fh.fileno())
            self._reading += 1
        return fd

    def close(self) -> None:
        """Drop this reader's maps and close its files, after any `read` in progress in another
        thread has finished; arrays already returned stay valid."""
        self._maps.clear()
        with self._fd_lock:
            while self._reading:
                self._fd_lock.wait()
            _close_fds(self._fds)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.path!r}, {len(self.names)} tensors in {len(self._headers)} file(s))"
