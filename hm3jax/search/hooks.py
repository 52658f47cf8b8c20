"""run_lower's hooks (levanter's): what is called after each chunk of a search, and the orbax
chunk checkpoints that make a search resumable.

    run_lower(..., hooks=[checkpoint_hook(dir), log_hook(fn), progress_hook(desc)])

A hook is any callable of a ChunkInfo, with optional `begin(start, num_chunks)` and `close()`;
`checkpoint_hook` (ChunkCheckpointer) also has `restore`, which decides where run_lower resumes.
Every chunk checkpoint is written through `_save_chunk` (looked up in this module at each call, so
a test's patch of `hooks._save_chunk` sees every write) and read back through `_restore_chunk`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hm3jax.io.atomic import checkpoint_write_error
from hm3jax.search.base import ChunkMetrics


class ChunkInfo(NamedTuple):
    """What a run_lower hook is called with after each chunk (levanter's StepInfo).

    chunk: index of the chunk just run (0-based; chunk + 1 chunks are done); num_chunks: chunks of
    the whole search; state: the searcher's state after it (device arrays); metrics: ChunkMetrics
    [C, N] of its iterations (host arrays); history: ChunkMetrics [num_chunks, C, N] (host arrays)
    of every chunk, filled up to `chunk` (restored ones included). Hooks must not modify them.
    """

    chunk: int
    num_chunks: int
    state: Any
    metrics: ChunkMetrics
    history: ChunkMetrics


# A hook: called with the ChunkInfo of each chunk run, in order, after the chunk (and after the hooks
# before it in the list). Optional methods: begin(start, num_chunks), called once before the first
# chunk run (start: chunks already done, restored from a checkpoint); close(), called once after
# the last one. A hook stops nothing: an exception it raises propagates out of run_lower, with the
# chunks saved so far kept by the checkpoint hook (which runs first).
Hook = Callable[[ChunkInfo], None]


class ChunkCheckpointer:
    """The checkpoint hook (checkpoint_hook): saves {state, history} with orbax after every chunk
    (as step chunk + 1, through _save_chunk), and `restore` resumes a search from the latest one."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.mngr = _chunk_manager(checkpoint_dir)

    def restore(self, state, history) -> tuple[int, Any, Any]:
        """(chunks done, state, history): those of the latest saved chunk, or (0, state, history)
        as given when none was saved."""
        step = self.mngr.latest_step()
        if step is None:
            return 0, state, history
        return (int(step), *_restore_chunk(self.mngr, int(step), state, history))

    def __call__(self, info: ChunkInfo) -> None:
        _save_chunk(self.mngr, info.chunk + 1, {"state": info.state, "history": info.history})

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def checkpoint_hook(checkpoint_dir: str | os.PathLike) -> ChunkCheckpointer:
    """A hook saving the search's state and history after every chunk into `checkpoint_dir` (the
    last two kept); run_lower resumes from it. `run_lower(checkpoint_dir=...)` adds it first."""
    return ChunkCheckpointer(checkpoint_dir)


class ProgressBar:
    """The progress hook (progress_hook): a tqdm bar of chunks, with the last iteration's mean
    reward and the most distinct paths scored by a preference."""

    def __init__(self, desc: str = "lower level"):
        self.desc, self.bar = desc, None

    def begin(self, start: int, num_chunks: int) -> None:
        self.bar = tqdm(total=num_chunks, initial=start, desc=self.desc, unit="chunk")

    def __call__(self, info: ChunkInfo) -> None:
        if self.bar is None:  # used without run_lower's begin: the bar starts at this chunk
            self.begin(info.chunk, info.num_chunks)
        m = info.metrics
        self.bar.update(1)
        self.bar.set_postfix(reward=float(m.reward[-1].mean()), paths=int(np.max(m.paths_scored[-1])))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_hook(desc: str = "lower level") -> ProgressBar:
    """A hook showing a tqdm bar labelled `desc` (`run_lower(progress=True)` adds it last)."""
    return ProgressBar(desc)


def log_hook(log: Callable[[int, ChunkMetrics], None]) -> Hook:
    """A hook calling `log(chunk index, ChunkMetrics [C, N])` after each chunk (`run_lower(log=...)`
    adds it after the checkpoint hook)."""

    def hook(info: ChunkInfo) -> None:
        log(info.chunk, info.metrics)

    return hook



def _orbax():
    # orbax is imported when a search first checkpoints: it adds about a second to the import of
    # hm3jax.search, which recommend --export and the zoo probe use without checkpointing
    import orbax.checkpoint as ocp

    return ocp


def _chunk_manager(checkpoint_dir: str | os.PathLike):
    """The orbax CheckpointManager of a search's chunk checkpoints (the last two kept). Saves are
    synchronous: a chunk counts as saved once save() returns, and a failed write is reported for
    that chunk rather than by a background thread later."""
    ocp = _orbax()
    return ocp.CheckpointManager(os.path.abspath(checkpoint_dir), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False))


def _restore_chunk(mngr, step: int, state, history):
    """(state, history) of chunk checkpoint `step`, in the structure of `state` and `history`
    (arrays or ShapeDtypeStructs); the history as writable numpy arrays, the state placed as
    trainer.init's is (_placed_like)."""
    ocp = _orbax()
    target = {"state": state, "history": history}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    restored = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))
    return jax.tree.map(_placed_like, restored["state"], state), jax.tree.map(np.array, restored["history"])


def _placed_like(restored: jax.Array, target) -> jax.Array:
    """`restored` uncommitted unless `target` (a fresh state's array, or a ShapeDtypeStruct) is
    committed: orbax returns arrays committed to their device, which jit lowers with explicit
    shardings, a different program from a fresh run's, so every resumed search would compile its
    chunk again (tens of seconds) instead of reusing the compilation cache."""
    if getattr(target, "committed", False) or not restored.committed:
        return restored
    if jnp.issubdtype(restored.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(restored))),
                                        impl=jax.random.key_impl(restored))
    return jnp.asarray(np.asarray(restored))


def _save_chunk(mngr, step: int, tree) -> None:
    """Save chunk checkpoint `step`; on a failed write (a full disk...) remove what orbax left of it
    and raise CheckpointWriteError naming it. The checkpoints of earlier chunks are kept."""
    ocp = _orbax()
    try:
        mngr.save(step, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
    except Exception as e:
        root = os.fspath(mngr.directory)
        for entry in os.listdir(root) if os.path.isdir(root) else ():
            if entry == str(step) or entry.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        with contextlib.suppress(Exception):
            mngr.close()
        raise checkpoint_write_error(os.path.join(root, str(step)), e) from None

