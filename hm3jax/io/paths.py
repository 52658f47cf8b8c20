"""Path rules shared by readers and writers: resolved comparisons, and files confined to a model directory."""

from __future__ import annotations

import os
import stat

from hm3jax.io.errors import CheckpointError

# The files of an HF tokenizer (any that exist are copied beside exported or merged weights).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG_FILE = "generation_config.json"


def real_path(path: str | os.PathLike) -> str:
    """Absolute path with every symlink resolved (a missing tail is kept as written)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies below it, after resolving both (`a`, `a/`, links alike)."""
    p, f = real_path(path), real_path(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def allowed_roots(root: str | os.PathLike) -> list[str]:
    """Where the files of model directory `root` may really live: `root` itself, and for a snapshot
    of the Hugging Face hub cache (`<repo>/snapshots/<revision>`, whose files link to
    `<repo>/blobs/`) that repository's `blobs` directory."""
    root = os.path.abspath(os.fspath(root))
    roots = [real_path(root)]
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) == "snapshots":
        roots.append(real_path(os.path.join(os.path.dirname(snapshots), "blobs")))
    return roots


def model_file(root: str | os.PathLike, name: str, where: str) -> str:
    """The path of file `name` of model directory `root`, refusing any that escapes it.

    `name` must be a relative path without `..` components; after resolving symlinks it must lie
    inside `root` (or, for a hub-cache snapshot, in its repository's blobs). `where` names the file or
    field that gave `name`, for the message. Raises CheckpointError.
    """
    root = os.fspath(root)
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{where}: expected a file name inside {root}, got {name!r:.80}")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise CheckpointError(f"{where}: file name {name!r:.200} is not a plain relative path inside the "
                              f"model directory {root} (absolute paths and '..' are refused)")
    path = os.path.join(root, name)
    real = real_path(path)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in allowed_roots(root)):
        raise CheckpointError(f"{where}: {name!r:.200} resolves to {real}, outside the model directory "
                              f"{root} (a symlink out of it is refused)")
    return path


class NotRegularFileError(CheckpointError, OSError):
    """A path that a reader was asked to open is a FIFO, socket, device or directory, not a file.

    Opening a FIFO blocks until a writer appears (forever, for a file named like a shard that nobody
    writes to), so readers check with `open_regular` before reading a byte."""

    def __init__(self, message: str, filename: str | None = None):
        ValueError.__init__(self, message)
        self.filename = filename

    def __str__(self) -> str:
        return self.args[0]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "file") -> None:
    """Raise NotRegularFileError unless `path` (after symlinks) is a regular file; a missing path
    raises FileNotFoundError. Does not open it, so a FIFO never blocks."""
    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path}: is {_kind(st.st_mode)}, not a regular {what}; refusing to read it",
                                  path)


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """Refuse a tokenizer directory holding a FIFO, socket or device where transformers opens a file
    (the tokenizer files, config.json, any other top-level *.json / *.txt / *.model / *.jinja): its
    open() would block forever on a FIFO. A path that is not a local directory is left alone."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    names = set(TOKENIZER_FILES) | {"config.json", GENERATION_CONFIG_FILE}
    with os.scandir(path) as entries:
        for e in entries:
            if e.name in names or e.name.endswith((".json", ".txt", ".model", ".jinja")):
                if os.path.exists(e.path) and not os.path.isdir(e.path) and not os.path.isfile(e.path):
                    check_regular(e.path, "tokenizer file")


def open_regular(path: str | os.PathLike, mode: str = "rb", what: str = "file", **kwargs):
    """`open(path, mode)` for reading, refusing anything but a regular file before reading from it.

    The file is opened non-blocking (a FIFO without a writer opens at once instead of hanging),
    checked with fstat on the open descriptor (no window for a swap between check and open), then
    switched back to blocking reads. Raises NotRegularFileError, or the OSError of os.open
    (FileNotFoundError, PermissionError, ...). `mode` must be a reading mode ("r", "rb").
    """
    if set(mode) - set("rbt"):
        raise ValueError(f"open_regular reads only; got mode {mode!r}")
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{path}: is {_kind(st.st_mode)}, not a regular {what}; refusing to "
                                      "read it", path)
        os.set_blocking(fd, True)
        return open(fd, mode, closefd=True, **kwargs)
    except BaseException:
        os.close(fd)
        raise
