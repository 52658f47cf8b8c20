"""Fixtures shared across test files.

The reduced model zoo (hm3jax.zoo.SMALL, seed 0) takes a minute or more to train on CPU, so it
is built once per pytest session and shared by test_zoo.py and test_upper.py.
"""

import time

import pytest

from hm3jax.zoo import SMALL, build_zoo, load_zoo


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """(zoo directory, manifest, build seconds) of a freshly built SMALL zoo (seed 0)."""
    out = tmp_path_factory.mktemp("zoo") / "small"
    start = time.perf_counter()
    manifest = build_zoo(out, SMALL, seed=0, progress=False)
    return out, manifest, time.perf_counter() - start


@pytest.fixture(scope="session")
def small_zoo_loaded(small_zoo):
    """load_zoo of the session's SMALL zoo: (ModelConfig, {name: params}, tokenizer)."""
    return load_zoo(small_zoo[0])


# Tests that train the zoo (directly or through these fixtures) are slow: `.ci/run` runs them after
# the fast tests. Other slow tests (parity with transformers / mergekit, command lines run in
# subprocesses, long searches) carry @pytest.mark.slow themselves.
_ZOO_FIXTURES = {"small_zoo", "small_zoo_loaded"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _ZOO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
