"""Errors raised by checkpoint I/O; each message names the file or tensor at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (directory, shard, index, GGUF file) or params pytree that cannot be used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path, or a file a checkpoint refers to, does not exist."""

    # FileNotFoundError's constructor would reinterpret a single message argument; keep it verbatim.
    def __init__(self, message: str, filename: str | None = None):
        ValueError.__init__(self, message)
        self.filename = filename

    def __str__(self) -> str:
        return self.args[0]


class PickleCheckpointError(CheckpointError):
    """A checkpoint stored only as pickle files (`*.bin`, `*.pt`) that was not explicitly allowed."""


def short_list(names, limit: int = 20) -> str:
    """Comma-separated names, cut after `limit` with a count of the rest (keeps messages readable)."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
