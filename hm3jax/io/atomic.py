"""All-or-nothing output directories: nothing half-written is ever visible at the final path."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from typing import Any, Iterator


class OutputExistsError(FileExistsError):
    """The output directory already exists and overwriting it was not requested."""

    def __init__(self, path: str):
        super().__init__(f"output {path} already exists; pass overwrite=True to replace it")
        self.filename = path

    def __str__(self) -> str:
        return self.args[0]


def _make_sibling(parent: str, name: str, tag: str) -> str:
    # os.mkdir (not tempfile.mkdtemp) so the final directory gets the usual umask permissions, not 0700.
    while True:
        path = os.path.join(parent, f".{name}.{tag}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _make_parents(parent: str) -> list[str]:
    """Create missing ancestors of the output; return the ones created (deepest last)."""
    created = []
    missing = []
    p = parent
    while not os.path.isdir(p):
        missing.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    for p in reversed(missing):
        os.mkdir(p)
        created.append(p)
    return created


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of `out_dir` to write into; move it into place only on success.

    Args:
      out_dir: the directory to produce. Missing parent directories are created (and removed again
        if the work fails).
      overwrite: replace an existing `out_dir`; the old directory is removed only after the new one
        is complete.

    Yields the temporary directory path (`<parent>/.<name>.tmp-<random>`). If the body raises, the
    temporary directory is deleted and the exception propagates; `out_dir` is left untouched.

    Raises:
      OutputExistsError: `out_dir` exists and `overwrite` is False (checked before any work).
      NotADirectoryError: `out_dir` exists and is not a directory.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise OutputExistsError(out_dir)
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise NotADirectoryError(f"output {out_dir} exists and is not a directory; refusing to replace it")
    created = _make_parents(parent)
    try:
        tmp = _make_sibling(parent, name, "tmp")
    except BaseException:
        for p in reversed(created):
            os.rmdir(p)
        raise
    try:
        yield tmp
        if os.path.lexists(out_dir):
            if not overwrite:
                raise OutputExistsError(out_dir)  # appeared while we were writing
            old = _make_sibling(parent, name, "old")
            os.rmdir(old)
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(p)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` through a temporary sibling and a rename, so `path`
    holds either its old content or the whole new document, never a partial one."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
