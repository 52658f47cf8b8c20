"""Issue 24, deliverable 1: a run killed right after ANY commit to its run directory (config.yaml,
each stage's arrays and digest, each search chunk's checkpoint, front.json, front.png, report.md),
then started again with the same command, continues to the same results and front.json as an
unbroken run.

The commit points are not listed here: tests/killpoints.py wraps the functions that commit and an
unbroken smoke run enumerates them, so a new stage or search is swept as soon as it saves. Each kill
point is the run directory copied as it was right after that commit (what a SIGKILL there leaves);
the last test also raises the kill inside a run.

To keep the sweep at about one run's cost, each kill point's resumed run is stopped at ITS next
commit, and what it committed (a stage's arrays, read back digest-checked; a chunk checkpoint's
state and history; front.json) must equal the unbroken run's. That run's later work
starts from exactly the directory of a later kill point (stage results are read back bit for bit,
and a search continues from the state and history it saved), which is itself swept; the kill points
from the last stage on run to the end and compare front.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from killpoints import Killed, commit_points, smoke_args

pytestmark = pytest.mark.slow  # a smoke run, then about one more in resumes


def _args(run, zoo) -> list[str]:
    return smoke_args(run, zoo)


@pytest.fixture
def swept_run(smoke_sweep):
    """The session's unbroken smoke run and the copies of its run directory taken at each commit
    (conftest.smoke_sweep): (run dir, [(commit name, copy)], zoo dir)."""
    return smoke_sweep


def test_the_sweep_finds_every_kind_of_commit(swept_run):
    _, snaps, _ = swept_run
    seen = [w for w, _ in snaps]
    assert seen[0] == "config.yaml" and seen[-4:] == ["front.json", "front.png", "front.svg", "report.md"]
    from hm3jax.run.stages import STAGES

    for stage in set(STAGES) - {"generated"}:  # generated: tasks.kind files only
        assert f"stage {stage} arrays" in seen and f"stage {stage} digest" in seen, stage
    for search in ("lower", "arch_only", "random_path", "evolutionary_path"):
        chunks = [w for w in seen if w.startswith(f"chunk {search} ")]
        assert len(chunks) >= 2, (search, chunks)  # a kill between chunks and after the last one
        assert seen.index(chunks[-1]) < seen.index(f"stage {search} arrays")


def test_a_kill_after_any_commit_resumes_to_the_same_front(swept_run, small_zoo, tmp_path, capsys):
    from killpoints import committed, differences, item

    from hm3jax.train import main as train

    run, snaps, _ = swept_run
    names = [w for w, _ in snaps]
    want = committed(run)
    last_stage = max(i for i, w in enumerate(names) if w.startswith("stage "))
    start, failed = time.perf_counter(), []
    for i, (what, snap) in enumerate(snaps):
        work = tmp_path / "resume"
        shutil.copytree(snap, work, symlinks=True)
        to_end = i >= last_stage
        try:
            with pytest.MonkeyPatch.context() as mp, commit_points(mp, kill_at=None if to_end else 1) as seen:
                rc = train(_args(work, small_zoo[0]))
        except Killed:
            rc = "killed"
        err = capsys.readouterr().err
        new = {item(w) for w in seen} - {None}  # what this run wrote (what it found is the unbroken run's)
        got = committed(work, new)
        if to_end and (rc != 0 or "front.json" not in got):
            failed.append((what, rc, err[-400:]))
        elif not to_end and (rc != "killed" or names.index(seen[0]) <= i):  # went on to a later commit
            failed.append((what, rc, seen[:1], err[-400:]))
        elif differences(got, want):
            failed.append((what, "differs", differences(got, want)))
        shutil.rmtree(work)
    print(f"{len(snaps)} kill points resumed in {time.perf_counter() - start:.0f}s")
    assert not failed, failed


def test_a_full_disk_then_a_kill_after_the_last_chunk_then_the_same_command(swept_run, small_zoo, tmp_path,
                                                                             capsys):
    """From the kill point after the lower level's first chunk: ENOSPC while saving the second chunk
    is one line naming that checkpoint (exit 1, the run directory kept, chunk 1 intact); the next run
    is killed right after its last chunk is saved and before the stage result is (the case of the
    issue: the lock is released, no stage result); the same command then ends with the unbroken
    run's front.json."""
    import errno

    import orbax.checkpoint as ocp

    from hm3jax.rundir import LOCK_FILE
    from hm3jax.train import main as train

    run, snaps, _ = swept_run
    snap = next(s for w, s in snaps if w == "chunk lower 1")
    work = tmp_path / "run"
    shutil.copytree(snap, work, symlinks=True)
    capsys.readouterr()

    def full(self, step, *a, **k):
        os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-3"))  # what orbax leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ocp.CheckpointManager, "save", full)
        assert train(_args(work, small_zoo[0])) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    ckpt = work / "checkpoints" / "lower"
    assert lines[0].startswith(f"error: no space left on device while writing {ckpt}/2; the run directory"), lines[0]
    assert sorted(os.listdir(ckpt)) == sorted(os.listdir(snap / "checkpoints" / "lower"))  # chunk 1 only

    with pytest.MonkeyPatch.context() as mp, commit_points(mp, kill_at=1):
        with pytest.raises(Killed, match="chunk lower 2"):
            train(_args(work, small_zoo[0]))
    assert (ckpt / "2").is_dir() and not os.path.exists(work / "checkpoints" / "stages" / "lower")
    assert (work / LOCK_FILE).read_text() == ""  # released, as the kernel drops a killed owner's flock
    capsys.readouterr()
    assert train(_args(work, small_zoo[0])) == 0
    assert json.loads((work / "front.json").read_text()) == json.loads((run / "front.json").read_text())
