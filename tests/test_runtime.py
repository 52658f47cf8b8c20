"""hm3jax.runtime: the once-only restart with glibc's huge-page malloc tunable."""

import json
import os
import subprocess
import sys

import pytest

from hm3jax import runtime

SCRIPT = """
import json, os, sys
from hm3jax.runtime import reexec_with_huge_pages
print("start", flush=True)
reexec_with_huge_pages()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:]}))
"""


def run(tmp_path, env_extra):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.DISABLE_ENV)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(script), "a b", "--flag"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return out[:-1], json.loads(out[-1])


def test_restarts_once_with_the_tunable_and_same_arguments(tmp_path):
    if not runtime.huge_pages_wanted() and "GLIBC_TUNABLES" not in os.environ:
        pytest.skip("no glibc >= 2.35 with THP in madvise mode here")
    starts, info = run(tmp_path, {})
    assert starts == ["start", "start"]  # the process ran twice, then stopped restarting
    assert runtime.TUNABLE in info["tunables"].split(":")
    assert info["argv"] == ["a b", "--flag"]


def test_keeps_user_tunables_and_respects_opt_out(tmp_path):
    if not runtime.huge_pages_wanted() and "GLIBC_TUNABLES" not in os.environ:
        pytest.skip("no glibc >= 2.35 with THP in madvise mode here")
    _, info = run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    assert info["tunables"] == f"glibc.malloc.trim_threshold=1048576:{runtime.TUNABLE}"
    starts, info = run(tmp_path, {runtime.DISABLE_ENV: "1"})
    assert starts == ["start"] and info["tunables"] == ""


def test_no_restart_when_already_set(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.TUNABLE)
    assert not runtime.huge_pages_wanted()
