"""A run's stage store and metrics log: each stage's result as an orbax checkpoint under
RUN_DIR/checkpoints/stages/<stage> with a digest beside it, and metrics.jsonl (plus TensorBoard).

Stage results are small arrays; merged models are recomputed from them (merges are deterministic),
never stored. The searches keep their own chunk checkpoints (search.lower.run_lower) under
RUN_DIR/checkpoints/<search>.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from hm3jax.config import RunConfigError
from hm3jax.io.atomic import CheckpointWriteError as CheckpointWriteError  # raised by StageStore.save
from hm3jax.io.atomic import checkpoint_write_error
from hm3jax.rundoc import round_floats

log = logging.getLogger(__name__)


class CorruptCheckpointError(RunConfigError):
    """A stage checkpoint that exists but cannot be restored, or whose arrays fail their digest."""

    def __init__(self, path: str, why: str):
        super().__init__(f"checkpoint {path} is corrupt or incomplete ({why}); remove it to recompute that stage")
        self.path, self.why = path, why


def _digest(tree: dict) -> str:
    """sha256 of a tree of numpy arrays: key paths, dtypes, shapes and bytes (orbax keeps no checksum
    of its own that a restore verifies, so flipped bytes would otherwise come back as results)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class StageStore:
    """Stage results as orbax checkpoints under RUN_DIR/checkpoints/stages/<stage> (pytrees of
    arrays), each with a digest beside it (<stage>.sha256) that `load` checks."""

    def __init__(self, run_dir: str):
        self.root = os.path.abspath(os.path.join(run_dir, "checkpoints"))

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _stage_path(self, name: str) -> str:
        return os.path.join(self.root, "stages", name)

    def load(self, name: str) -> dict | None:
        """The saved result of stage `name`, or None when it was never saved.

        Raises CorruptCheckpointError when the checkpoint exists but cannot be restored (truncated
        or emptied metadata, an empty directory, unreadable arrays) or its arrays differ from the
        digest written with them."""
        p = self._stage_path(name)
        if not os.path.lexists(p):
            return None
        if not os.path.isdir(p):
            raise CorruptCheckpointError(p, "not a directory")
        try:
            with ocp.StandardCheckpointer() as ckpt:
                tree = jax.tree.map(np.asarray, ckpt.restore(p))
        except Exception as e:  # orbax and tensorstore raise many types (JSON, OS, DATA_LOSS ValueError, ...)
            raise CorruptCheckpointError(p, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(p, f"restored a {type(tree).__name__}, not a mapping of arrays")
        try:
            with open(p + ".sha256") as f:
                want = f.read().strip()
        except FileNotFoundError:
            return tree  # written before digests existed, or killed between the two writes
        except OSError as e:
            raise CorruptCheckpointError(p, f"its digest {p}.sha256 cannot be read: {e.strerror}") from None
        if _digest(tree) != want:
            raise CorruptCheckpointError(p, f"its arrays do not match the digest {p}.sha256")
        return tree

    def discard(self, name: str) -> None:
        """Remove stage `name`'s checkpoint and digest (to recompute it)."""
        p = self._stage_path(name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        with contextlib.suppress(FileNotFoundError):
            os.remove(p + ".sha256")

    def save(self, name: str, tree: dict) -> dict:
        """Save stage `name` (orbax writes a temporary directory, then renames it) and its digest.
        Raises CheckpointWriteError ("no space left on device while writing <path>" for a full
        disk), leaving no partial checkpoint, when the disk refuses it."""
        p = self._stage_path(name)
        tree = jax.tree.map(np.asarray, tree)
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(p + ".sha256")  # a digest never outlives the checkpoint it was written for
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(p, tree)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=f".{name}.sha256.")
            with os.fdopen(fd, "w") as f:
                f.write(_digest(tree) + "\n")
            os.replace(tmp, p + ".sha256")
        except Exception as e:
            self._clean_partial(name)
            raise checkpoint_write_error(p, e) from None
        return tree

    def _clean_partial(self, name: str) -> None:
        folder = os.path.join(self.root, "stages")
        for entry in os.listdir(folder) if os.path.isdir(folder) else ():
            if entry.startswith((f"{name}.orbax-checkpoint-tmp", f".{name}.sha256.")):
                full = os.path.join(folder, entry)
                if os.path.isdir(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(full)
        self.discard(name)


_TB_WARNED = [False]


def _scalars(prefix: str, v):
    """(tag, value) of every number in a record value: numbers as they are, lists per index
    (`reward/0`: preference 0), mappings per key (`hypervolume/hm3`)."""
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        yield prefix, float(v)
    elif isinstance(v, Mapping):
        for k, x in v.items():
            yield from _scalars(f"{prefix}/{k}", x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _scalars(f"{prefix}/{i}", x)


def metrics_logger(run_dir: str, tensorboard: bool) -> Callable[[dict], None]:
    """Append each record to metrics.jsonl (floats to 6 significant digits) and, with tensorboardX,
    its numbers as scalars to tensorboard/ ("<stage>/<key>[/<index or name>]"). The step of a record
    is its "iteration" (the PPO iteration of a search's per-iteration record), else its "step", else
    0 for a stage's own record. `tensorboard` without tensorboardX installed: one warning per process,
    metrics.jsonl only."""
    path = os.path.join(run_dir, "metrics.jsonl")
    writer = None
    if tensorboard:
        try:
            # tensorboardX is an optional dependency (the tensorboard extra)
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            if not _TB_WARNED[0]:
                _TB_WARNED[0] = True
                log.warning("log.tensorboard is on but tensorboardX is not installed (pip install tensorboardX); "
                            "metrics go to metrics.jsonl only. Set log.tensorboard false to silence this.")

    def plain(x):
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return plain(np.asarray(x).tolist())
        return x

    def write(record: dict) -> None:
        # The timestamp is kept to the millisecond: rounding it to JSON_DIGITS significant digits
        # would put every record of a day at the same 10 000 s.
        record = {"time": round(time.time(), 3), **round_floats(plain(record))}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            step = int(record.get("iteration", record.get("step", 0)))
            stage = record.get("stage", "run")
            for k, v in record.items():
                if k in ("time", "iteration", "step", "chunk", "stage"):
                    continue
                for tag, x in _scalars(f"{stage}/{k}", v):
                    writer.add_scalar(tag, x, step)
            writer.flush()

    return write
