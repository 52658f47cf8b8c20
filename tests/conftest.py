"""Fixtures shared across test files.

The reduced model zoo (hm3jax.zoo.SMALL, seed 0) takes about 50 s to train on CPU, so it
is built once per test run and shared by every test file that needs it: under pytest-xdist the
workers share one build (the first to get the lock builds it, the others reuse it from its
zoo.json). Compiled XLA programs are cached on disk (in .pytest_cache, across runs and tiers),
in-process and in the subprocesses tests start, so a program compiled by one test or worker is not
compiled again.
"""

import os
import time

import jax
import pytest

from hm3jax.zoo import SMALL, build_zoo, load_zoo


def _run_dir(tmp_path_factory):
    """A directory shared by every worker of this test run (pytest's base temp, or its parent under
    pytest-xdist, whose workers each get a subdirectory of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# The on-disk cache of compiled XLA programs lives in the checkout's .pytest_cache, so the slow tier
# reuses what the fast tier compiled and a second run of the suite reuses both. Entries are keyed by
# the program, the compile options and the jax/XLA versions, so a stale entry is never used; the
# least recently used are dropped past CACHE_BYTES.
CACHE_BYTES = 512 << 20


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(request):
    cache = request.config.cache.mkdir("jax-compilation-cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_BYTES)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # inherited by subprocesses
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(CACHE_BYTES)
    yield


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """(zoo directory, manifest, build seconds) of the run's SMALL zoo (seed 0), built by this worker
    or by another one (then the seconds are the time this worker waited and loaded it)."""
    from filelock import FileLock

    root = _run_dir(tmp_path_factory)
    out = root / "zoo-small"
    start = time.perf_counter()
    with FileLock(str(root / "zoo-small.lock")):
        manifest = build_zoo(out, SMALL, seed=0, progress=False)
    return out, manifest, time.perf_counter() - start


@pytest.fixture(scope="session")
def smoke_sweep(small_zoo, tmp_path_factory):
    """One unbroken smoke run (configs/smoke.yaml on the session's SMALL zoo), run in-process with a
    copy of its run directory taken right after each commit (tests/killpoints.py):
    (run dir, [(commit name, copy)], zoo dir). The test files that need a finished smoke run
    (test_train, test_killpoints) share it: under pytest-xdist the first worker to get the lock runs
    it, the other reads its listing. Tests must not modify it (copy it first)."""
    import json
    import shutil
    from pathlib import Path

    from filelock import FileLock
    from killpoints import commit_points, smoke_args

    from hm3jax.train import main as train

    root = _run_dir(tmp_path_factory)
    home, listing = root / "smoke", root / "smoke" / "commits.json"
    with FileLock(str(root / "smoke.lock")):
        if not listing.exists():
            shutil.rmtree(home, ignore_errors=True)  # a run that failed part way
            run, snaps = home / "run", []

            def snapshot(what):
                dest = home / "snap" / f"{len(snaps):02d}"
                shutil.copytree(run, dest, symlinks=True)
                snaps.append((what, str(dest)))

            with pytest.MonkeyPatch.context() as mp, commit_points(mp, on_commit=snapshot) as seen:
                assert train(smoke_args(run, small_zoo[0])) == 0
            assert [w for w, _ in snaps] == seen
            listing.write_text(json.dumps(snaps))
    return home / "run", [(w, Path(p)) for w, p in json.loads(listing.read_text())], small_zoo[0]


@pytest.fixture(scope="session")
def small_zoo_loaded(small_zoo):
    """load_zoo of the session's SMALL zoo: (ModelConfig, {name: params}, tokenizer)."""
    return load_zoo(small_zoo[0])


# Tests that train the zoo (directly or through these fixtures) are slow: `.ci/run` runs them after
# the fast tests. Other slow tests (parity with transformers / mergekit, command lines run in
# subprocesses, long searches) carry @pytest.mark.slow themselves.
_ZOO_FIXTURES = {"small_zoo", "small_zoo_loaded"}


# The longest test files run first, so that under pytest-xdist (one file per worker) the last file to
# start is a short one; the second needs no zoo, so its worker does not wait while the first builds it.
_FIRST = ("test_train.py", "test_sharding.py", "test_train_tasks.py", "test_zoo.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _ZOO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable: file order otherwise kept


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    """A run directory over tiny checkpoints (base + 3 experts): config.yaml and a valid front.json
    (the untrusted-input tests; one per test module)."""
    import numpy as np
    from reliability_helpers import CFG, TASKS, solution, write_front

    from hm3jax.config import CheckpointSource, ModelsConfig, RunConfig, to_yaml, validate
    from hm3jax.io import save_pretrained
    from hm3jax.models import init_params

    root = tmp_path_factory.mktemp("untrusted")
    base = init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    experts = [jax.tree.map(lambda a: np.asarray(a) + 0.01 * rng.standard_normal(a.shape, np.float32), base)
               for _ in TASKS]
    ck = {n: save_pretrained(root / "models" / n, CFG, p) for n, p in zip(["base", *TASKS], [base, *experts])}
    run = root / "run"
    run.mkdir()
    cfg = validate(RunConfig(output_dir=str(run), models=ModelsConfig(checkpoints=CheckpointSource(
        base=ck["base"], experts={t: ck[t] for t in TASKS}))))
    (run / "config.yaml").write_text(to_yaml(cfg))
    write_front(run, [solution()])
    return root, run


@pytest.fixture
def run_copy(ckpt_run, tmp_path):
    """A fresh copy of the module's run directory (its models shared), per test."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ckpt_run[1], run)
    return run
