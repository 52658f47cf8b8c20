"""The code sandbox (objectives.sandbox.run_program): no false pass, no process outlives a run, bounded output."""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest

from hm3jax.io.atomic import pid_alive
from hm3jax.objectives.sandbox import run_program

F_TESTS = "assert f() == 2"


@pytest.mark.parametrize("program", [
    "import sys\ndef f(): return 1\nsys.exit(0)",
    "def f(): return 1\nraise SystemExit",
    "import os\ndef f(): return 1\nos._exit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef f(): return 1",
    "import sys\nsys.excepthook = lambda *a: None\ndef f(): return 1",
    "import os, signal\ndef f(): return 1\nos.kill(os.getpid(), signal.SIGTERM)",
    # The tests are compiled on their own: an open string cannot swallow them.
    'def f(): return 1\nx = """',
    # The pass channel is not the program's output, and it needs the run's nonce.
    "import os\ndef f(): return 1\nfor fd in range(3, 64):\n    try: os.write(fd, b'ok')\n"
    "    except OSError: pass\nos._exit(0)",
], ids=["sys.exit", "SystemExit", "os._exit", "atexit", "excepthook", "sigterm", "open_string", "forged"])
def test_no_pass_unless_the_tests_ran_to_their_end(program):
    r = run_program(program, F_TESTS, timeout_s=5)
    assert (r.passed, r.status) == (False, "failed"), r
    assert run_program(program.replace("return 1", "return 2"), F_TESTS + "\nimport sys\nsys.exit(0)").passed \
        is False  # a test that exits early is not a pass either
    assert run_program("def f(): return 2", F_TESTS).passed


def _pids(path) -> list[int]:
    return [int(x) for x in open(path).read().split()] if os.path.exists(path) else []


@pytest.mark.parametrize("case", ["setsid", "double_fork", "popen_session", "hold_pipes"])
def test_every_descendant_is_killed_when_the_run_ends(tmp_path, case):
    pids = tmp_path / "pids"
    record = f"open({str(pids)!r}, 'a').write('%d\\n' % os.getpid())"
    body = {
        "setsid": f"if os.fork() == 0:\n    os.setsid()\n    {record}\n    time.sleep(300)\n",
        "double_fork": (f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        {record}\n"
                        "        time.sleep(300)\n    os._exit(0)\n"),
        "popen_session": (f"p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                          f"open({str(pids)!r}, 'a').write('%d\\n' % p.pid)\n"),
        # Keeps stdout/stderr open and never exits: the run must still end at its timeout.
        "hold_pipes": f"if os.fork() == 0:\n    os.setsid()\n    {record}\n    while True: time.sleep(1)\n"
                      "time.sleep(100)\n",
    }[case]
    program = "import os, subprocess, time\n" + body + "time.sleep(0.3)\ndef f(): return 2\n"
    start = time.monotonic()
    r = run_program(program, F_TESTS, timeout_s=2)
    took = time.monotonic() - start
    assert r.status == ("timeout" if case == "hold_pipes" else "passed"), r
    assert took < 3.5, took  # never waits on a descendant beyond the timeout
    found = _pids(pids)
    assert found
    deadline = time.monotonic() + 2
    while any(pid_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(pid_alive(p) for p in found)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_descendants_die_when_the_program_kills_or_stops_its_wrapper(tmp_path, signal_name):
    """The program starts a setsid() grandchild, then kills (or stops) the wrapper that would have
    killed it: run_program still leaves no process of the run behind (the caller sweeps for them)."""
    pids = tmp_path / "pids"
    program = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        open({str(pids)!r}, 'a').write('%d\\n' % os.getpid())\n        time.sleep(300)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        f"os.kill(os.getppid(), signal.{signal_name})\n"
        "def f(): return 2\n")
    start = time.monotonic()
    r = run_program(program, F_TESTS, timeout_s=2)
    assert time.monotonic() - start < 4
    assert not r.passed, r  # the wrapper never reported a pass
    found = _pids(pids)
    assert found
    deadline = time.monotonic() + 2
    while any(pid_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(pid_alive(p) for p in found), found


def test_captured_output_is_bounded():
    flood = "import sys\nfor _ in range(200):\n    sys.stdout.write('y' * 10**6)\n    sys.stderr.write('x' * 10**6)\n"
    tracemalloc.start()
    try:
        r = run_program(flood + "sys.stderr.write('THE END')\nraise ValueError('boom')", timeout_s=30,
                        memory_mb=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == "failed" and r.detail.endswith("ValueError: boom\n") and len(r.detail) <= 2000
    assert peak < 8 * 2**20, peak  # 400 MB printed, a few MB held


def test_process_limit_is_set():
    """RLIMIT_NPROC: the user's current task count plus max_processes (binding for non-root users)."""
    tasks = sum(1 for _ in os.scandir("/proc") if _.name.isdigit())  # a lower bound of all tasks
    r = run_program("import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_NPROC)",
                    f"assert soft == hard <= {tasks * 64 + 10_000}, (soft, hard)", timeout_s=5,
                    max_processes=16)
    assert r.passed, r
