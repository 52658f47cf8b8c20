"""Kill points of a run: every place where `python -m hm3jax.train` commits something to its run
directory, found by wrapping the functions that commit (no list of stages is kept here, so a new
stage or search is covered as soon as it saves through StageStore or run_lower's chunk checkpoints).

    with commit_points(monkeypatch, kill_at=None, on_commit=None) as seen: train(args)

counts the commits (seen: their names, in order); with `kill_at=N` the N-th commit (1-based)
raises Killed right after it is on disk, as a SIGKILL there would leave the directory; `on_commit`
is called with each commit's name first (e.g. to copy the run directory as it is at that point).
"""

from __future__ import annotations

import contextlib
import os


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` of the code under test sees it."""


@contextlib.contextmanager
def commit_points(monkeypatch, kill_at: int | None = None, on_commit=None):
    import orbax.checkpoint as ocp

    from hm3jax import pipeline, report, train
    from hm3jax.search import lower

    seen: list[str] = []

    def commit(what: str) -> None:
        seen.append(what)
        if on_commit is not None:
            on_commit(what)
        if kill_at is not None and len(seen) == kill_at:
            raise Killed(what)

    def wrap(owner, name, label, after=None):
        orig = getattr(owner, name)

        def wrapped(*a, **k):
            out = orig(*a, **k)
            if after is not None:
                after(*a)
            commit(label(*a))
            return out

        monkeypatch.setattr(owner, name, wrapped)

    def stage_arrays(self, path, *a):  # orbax wrote the stage's arrays, its digest not yet
        self.wait_until_finished()

    wrap(train, "prepare_run_dir", lambda cfg: "config.yaml")
    wrap(ocp.StandardCheckpointer, "save", lambda self, path, *a: f"stage {os.path.basename(path)} arrays",
         after=stage_arrays)
    wrap(pipeline.StageStore, "save", lambda self, name, tree: f"stage {name} digest")
    wrap(lower, "_save_chunk",
         lambda mngr, step, tree: f"chunk {os.path.basename(os.fspath(mngr.directory))} {step}")
    wrap(report, "write_json_atomic", lambda path, *a, **k: os.path.basename(path))
    wrap(report, "_write_via_temp", lambda path, *a, **k: os.path.basename(path))
    yield seen
