"""All-or-nothing output directories: nothing half-written is ever visible at the final path.

Also the guards every writer shares: an output may not be, contain or lie inside one of its inputs
(`check_output_path`), and temporary siblings left by a killed process are cleaned up by the next
run (`clean_stale_temp_dirs`). Temporary siblings are named `.<name>.tmp-<pid>-<host>-<random>`
(`.old-` for a replaced output on its way out), so a later run can tell whether their writer is alive.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from hm3jax.io import interrupt
from hm3jax.io.paths import is_within, real_path


class OutputExistsError(FileExistsError):
    """The output directory already exists and overwriting it was not requested.

    `option` is how the caller asks for a replacement ("overwrite=True" in Python, "--overwrite" on a
    command line); it is only used in the message.
    """

    def __init__(self, path: str, option: str = "overwrite=True"):
        super().__init__(f"output {path} already exists; pass {option} to replace it")
        self.filename = path

    def __str__(self) -> str:
        return self.args[0]


class UnsafeOutputError(ValueError):
    """An output path that would overwrite, or be written inside, one of the inputs (or a directory
    that must never be replaced, such as the current directory)."""


class NonFiniteValueError(ValueError):
    """A document to be written holds NaN or ±Inf, which JSON cannot hold (and no result should)."""


class UnwritableOutputError(OSError):
    """An output location that cannot be created or written (below a file, read-only, no permission)."""

    def __str__(self) -> str:
        return self.args[0]


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, lost permissions); nothing of it is kept."""

    def __str__(self) -> str:
        return self.args[0]


def checkpoint_write_error(path: str, e: BaseException) -> CheckpointWriteError:
    """The one-line CheckpointWriteError for a failed write of checkpoint `path`. A full disk
    (ENOSPC, or tensorstore's RESOURCE_EXHAUSTED / "No space left" text) reads "no space left on
    device while writing <path>"; anything else names the error."""
    text = str(e).strip()
    first = text.splitlines()[0][:160] if text else ""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "RESOURCE_EXHAUSTED" in text:
        return CheckpointWriteError(f"no space left on device while writing {path}")
    return CheckpointWriteError(f"checkpoint {path} could not be written ({type(e).__name__}: {first})")


class StaleTempWarning(UserWarning):
    """Temporary output directories were found whose writer cannot be shown to be gone."""


# ------------------------------------------------------------------------------------ path checks
def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                      what: str = "output") -> None:
    """Refuse an output that is, contains, or lies inside any of `inputs` (files or directories).

    Paths are compared after resolving symlinks and `..`, so `a`, `a/`, `./x/../a` and a link to `a`
    are the same. `None` inputs are skipped. Call it before writing anything.

    Raises:
      UnsafeOutputError: naming the input and how the two paths overlap.
    """
    o = real_path(out)
    for inp in inputs:
        if inp is None:
            continue
        i = real_path(inp)
        shown = os.fspath(inp)
        if o == i:
            why = "is the input"
        elif is_within(i, o):
            why = "contains the input"
        elif is_within(o, i):
            why = "lies inside the input"
        else:
            continue
        same = "" if os.path.abspath(shown) == i else f" ({i})"
        raise UnsafeOutputError(f"{what} {os.fspath(out)} {why} {shown}{same}; writing it could destroy "
                                f"that input, so choose an {what} path outside every input")


def _protected(out: str) -> str | None:
    """Why the existing directory `out` must never be replaced (None when it may be)."""
    o = real_path(out)
    if o == os.path.dirname(o):
        return "it is the filesystem root"
    with contextlib.suppress(OSError):
        if is_within(os.getcwd(), o):
            return "it contains the current directory"
    home = os.path.expanduser("~")
    if home and home != "~" and real_path(home) == o:
        return "it is the home directory"
    return None


# ------------------------------------------------------------------------------- temporary siblings
def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


_TEMP_RE = re.compile(r"^(?P<kind>tmp|old)-(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-)?[0-9a-f]{8}$")


def _make_sibling(parent: str, name: str, tag: str) -> str:
    # os.mkdir (not tempfile.mkdtemp) so the final directory gets the usual umask permissions, not 0700.
    while True:
        path = os.path.join(parent, f".{name}.{tag}-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie counts as exited)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def temp_dirs(out_dir: str | os.PathLike) -> list[tuple[str, str, int | None, bool]]:
    """Temporary siblings of `out_dir` (directories of atomic_output_dir, files of
    write_json_atomic), as (path, kind, pid, stale).

    kind is "tmp" (an output being written) or "old" (a replaced output being removed); pid is the
    writer's process id, None for names without one (written by an older version); stale is True
    only when that writer ran on this host and is no longer running.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    prefix = f".{name}."
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    host = _host_tag()
    for entry in sorted(entries):
        if not entry.startswith(prefix):
            continue
        m = _TEMP_RE.match(entry[len(prefix):])
        path = os.path.join(parent, entry)
        if m is None or os.path.islink(path) or not (os.path.isdir(path) or os.path.isfile(path)):
            continue
        pid = int(m["pid"]) if m["pid"] else None
        stale = pid is not None and m["host"] == host and not pid_alive(pid)
        found.append((path, m["kind"], pid, stale))
    return found


def clean_stale_temp_dirs(out_dir: str | os.PathLike, remove: bool = True) -> tuple[list[str], list[str]]:
    """Remove the temporary siblings of `out_dir` that a killed writer left behind.

    A directory is stale when the process named in it ran on this host and is gone. If `out_dir`
    itself is missing because its writer was killed between moving the old output aside and moving
    the new one in, the old output is moved back first (so the previous result is never lost).
    Directories whose writer may still be running, or that carry no process id, are left alone and
    reported.

    Args:
      out_dir: the output directory whose siblings to inspect.
      remove: False only reports (nothing is changed).

    Returns (stale directories removed or restored, directories kept because their writer may live).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    found = temp_dirs(out_dir)
    stale = [p for p, _, _, s in found if s]
    kept = [p for p, _, _, s in found if not s]
    if not remove:
        return stale, kept
    old = [p for p, kind, _, s in found if s and kind == "old"]
    done = []
    if len(old) == 1 and not os.path.lexists(out_dir):
        os.rename(old[0], out_dir)  # killed between the two renames: bring the previous output back
        done.append(old[0])
        stale.remove(old[0])
    for p in stale:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
        if not os.path.lexists(p):
            done.append(p)
        else:
            kept.append(p)
    return done, kept


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
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[str]:
    """Yield a temporary sibling of `out_dir` to write into; move it into place only on success.

    Args:
      out_dir: the directory to produce. Missing parent directories are created (and removed again
        if the work fails).
      overwrite: replace an existing `out_dir`; the old directory is removed only after the new one
        is complete. The filesystem root, the home directory and any directory containing the
        current directory are never replaced.
      inputs: paths the work reads; `out_dir` may not be, contain or lie inside any of them
        (see check_output_path).

    Yields the temporary directory path (`<parent>/.<name>.tmp-<pid>-<host>-<random>`). If the body
    raises (KeyboardInterrupt included), or a signal was noted by hm3jax.io.interrupt while it ran,
    the temporary directory is deleted and the exception propagates; `out_dir` is left untouched. Temporary siblings left by killed writers are removed
    first (see clean_stale_temp_dirs); ones whose writer may be alive are reported with a
    StaleTempWarning.

    Raises:
      OutputExistsError: `out_dir` exists and `overwrite` is False (checked before any work).
      UnsafeOutputError: `out_dir` overlaps an input, or is a directory that is never replaced.
      NotADirectoryError: `out_dir` exists and is not a directory.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_path(out_dir, inputs)
    parent, name = os.path.split(out_dir)
    _, kept = clean_stale_temp_dirs(out_dir)
    if kept:
        warnings.warn(f"{len(kept)} temporary director{'y' if len(kept) == 1 else 'ies'} of {out_dir} may "
                      f"belong to a running writer and were left alone: {', '.join(kept)}", StaleTempWarning,
                      stacklevel=3)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise OutputExistsError(out_dir)
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise NotADirectoryError(f"output {out_dir} exists and is not a directory; refusing to replace it")
        why = _protected(out_dir)
        if why:
            raise UnsafeOutputError(f"output {out_dir}: refusing to replace it, {why}")
    created = _make_parents(parent)
    try:
        tmp = _make_sibling(parent, name, "tmp")
    except BaseException:
        for p in reversed(created):
            os.rmdir(p)
        raise
    try:
        yield tmp
        interrupt.check()  # a signal that arrived while writing: do not publish
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


def first_nonfinite(obj: Any, where: str = "") -> str | None:
    """The path (e.g. `solutions[2].scores.heldout[0]`) of the first NaN or ±Inf number in a JSON-like
    document of dicts, lists, tuples and numbers, or None when every number is finite."""
    stack = [(where, obj)]
    while stack:
        at, x = stack.pop()
        if isinstance(x, float):
            if not math.isfinite(x):
                return at or "<document>"
        elif isinstance(x, dict):
            stack.extend((f"{at}.{k}" if at else str(k), v) for k, v in reversed(list(x.items())))
        elif isinstance(x, (list, tuple)):
            stack.extend((f"{at}[{i}]", v) for i, v in reversed(list(enumerate(x))))
    return None


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output location that could not be written, before any work is done for it.

    The nearest existing ancestor of `path` (or `path` itself when it is an existing directory) must
    be a directory in which this process can create a file: a file is created there and removed at
    once, so read-only mounts, missing permissions and a path below a regular file are all caught,
    root's permission bypass included. An existing `path` that is not a directory is left to the
    caller (writers refuse or replace it explicitly).

    Raises UnwritableOutputError naming `what`, the path and the reason.
    """
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.isdir(probe):
        if os.path.lexists(probe) and probe != path:
            raise UnwritableOutputError(f"{what} {path}: {probe} is not a directory (a file is in the way), "
                                        "so nothing can be created below it")
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hm3jax-write-probe-")
    except OSError as e:
        raise UnwritableOutputError(f"{what} {path}: cannot create files in {probe} "
                                    f"({e.strerror or e}); choose a writable location") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Write `obj` as indented JSON to `path` through a temporary sibling and a rename, so `path`
    holds either its old content or the whole new document, never a partial one.

    `inputs`: files or directories the caller read; `path` may not be one of them or lie inside
    one (UnsafeOutputError). An existing directory at `path` is refused (IsADirectoryError). The
    temporary file is `.<name>.tmp-<pid>-<host>-<random>`; ones left by a killed writer are removed.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_path(path, inputs)
    bad = first_nonfinite(obj)
    if bad is not None:
        raise NonFiniteValueError(f"{path}: refusing to write a non-finite number (NaN or Inf) at {bad}; "
                                  "JSON cannot hold it and no result should")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file path for the JSON output")
    folder, name = os.path.split(path)
    clean_stale_temp_dirs(path)  # temporary files of a writer that was killed
    while True:
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
