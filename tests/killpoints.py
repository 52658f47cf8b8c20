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

SMOKE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.yaml")


def smoke_args(run, zoo) -> list[str]:
    """The train command line of a smoke run into `run` on the zoo at `zoo`."""
    return ["--config_path", SMOKE_CONFIG, "--output_dir", str(run), "--models.zoo.dir", str(zoo)]


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` of the code under test sees it."""


@contextlib.contextmanager
def commit_points(monkeypatch, kill_at: int | None = None, on_commit=None):
    import orbax.checkpoint as ocp

    from hm3jax import report, train
    from hm3jax.run import store
    from hm3jax.search import hooks

    seen: list[str] = []

    def commit(what: str) -> None:
        seen.append(what)
        if on_commit is not None:
            on_commit(what)
        if kill_at is not None and len(seen) == kill_at:
            raise Killed(what)

    def wrap(owner, name, label, after=None, wrote=lambda out: True):
        orig = getattr(owner, name)

        def wrapped(*a, **k):
            out = orig(*a, **k)
            if after is not None:
                after(*a)
            if wrote(out):
                commit(label(*a))
            return out

        monkeypatch.setattr(owner, name, wrapped)

    def stage_arrays(self, path, *a):  # orbax wrote the stage's arrays, its digest not yet
        self.wait_until_finished()

    wrap(train, "prepare_run_dir", lambda cfg: "config.yaml", wrote=lambda resumed: not resumed)
    wrap(ocp.StandardCheckpointer, "save", lambda self, path, *a: f"stage {os.path.basename(path)} arrays",
         after=stage_arrays)
    wrap(store.StageStore, "save", lambda self, name, tree: f"stage {name} digest")
    wrap(hooks, "_save_chunk",
         lambda mngr, step, tree: f"chunk {os.path.basename(os.fspath(mngr.directory))} {step}")
    wrap(report, "write_json_atomic", lambda path, *a, **k: os.path.basename(path))
    wrap(report, "_write_via_temp", lambda path, *a, **k: os.path.basename(path))
    yield seen


def item(commit: str) -> str | None:
    """The key of `committed` that commit `commit` wrote (None: nothing later work reads)."""
    if commit.startswith("stage "):
        return " ".join(commit.split()[:2])
    return commit if commit.startswith("chunk ") or commit == "front.json" else None


def committed(run_dir, only: set | None = None) -> dict:
    """What a run directory holds that later stages and front.json are built from, as comparable
    values: {"stage NAME": {key: array}} (StageStore.load, digest checked), {"chunk SEARCH STEP":
    {key path: array}} (each search chunk checkpoint's state and history) and {"front.json": doc};
    `only`: just these keys."""
    import json

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from hm3jax.run.store import StageStore

    run_dir = os.fspath(run_dir)
    out: dict = {}
    store = StageStore(run_dir)
    stages = os.path.join(store.root, "stages")
    for name in sorted(os.listdir(stages)) if os.path.isdir(stages) else ():
        if os.path.isdir(os.path.join(stages, name)) and "." not in name and (only is None or f"stage {name}" in only):
            out[f"stage {name}"] = store.load(name)
    for search in sorted(os.listdir(store.root)) if os.path.isdir(store.root) else ():
        folder = os.path.join(store.root, search)
        if search == "stages" or not os.path.isdir(folder):
            continue
        for step in sorted(s for s in os.listdir(folder) if s.isdigit()
                           and (only is None or f"chunk {search} {s}" in only)):
            with ocp.StandardCheckpointer() as ckpt:
                tree = ckpt.restore(os.path.join(folder, step, "default"))
            out[f"chunk {search} {step}"] = {jax.tree_util.keystr(p): np.asarray(v)
                                            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    front = os.path.join(run_dir, "front.json")
    if os.path.isfile(front) and (only is None or "front.json" in only):
        with open(front) as f:
            out["front.json"] = json.load(f)
    return out


def differences(got: dict, want: dict) -> list[str]:
    """Keys of `got` (see committed) whose value is not exactly `want`'s."""
    import numpy as np

    bad = []
    for k, v in got.items():
        w = want.get(k)
        if isinstance(v, dict) and isinstance(w, dict) and k != "front.json":
            if set(v) != set(w) or any(np.asarray(v[a]).dtype != np.asarray(w[a]).dtype
                                       or not np.array_equal(v[a], w[a], equal_nan=np.asarray(v[a]).dtype.kind == "f")
                                       for a in v):
                bad.append(k)
        elif v != w:
            bad.append(k)
    return bad
