"""Path rules shared by readers and writers: resolved comparisons, and files confined to a model directory."""

from __future__ import annotations

import os

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
