"""A sandbox for running generated programs against their tests (code pass@k).

What run_program guarantees: a run passes only if the test code ran to its end
(a per-run random nonce is written, after the tests, to a pipe that is not the program's output, so
`sys.exit(0)`, `os._exit(0)` or an atexit hook before or instead of the tests is a failure); CPU time,
address space, file size and (for non-root users) process count are limited; every process the
program starts, including ones that call `setsid()` or daemonise, is killed when the run ends (a
wrapper process is their child subreaper, and the calling process itself then sweeps /proc for
every process that carries the run's random token in its environment, and their descendants, so
even a program that kills or stops its wrapper leaves nothing running); captured output is bounded (stdout is discarded, the last
64 KiB of stderr are kept); the call returns within about `timeout_s` even if a descendant keeps the
pipes open. What it does not isolate: the network, the file system (the program can read and write
whatever the user can, outside its temporary working directory too), other processes of the same
user (it can signal them, the wrapper included; a descendant that re-executes itself with a new
environment *and* escapes the wrapper before it is killed is out of reach of the sweep), and the
interpreter's own memory (a program that
deliberately searches it can find the nonce). RLIMIT_NPROC does not bind root. Run untrusted code only
inside a container or VM.
"""

from __future__ import annotations

import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple


class ExecResult(NamedTuple):
    """Outcome of one program run: status is "passed", "failed", "timeout" or "memory"."""

    passed: bool
    status: str
    detail: str


# The wrapper (a fresh interpreter, no threads) becomes the child subreaper of everything the
# candidate starts, forks the candidate, waits for it, then kills every remaining descendant (found
# through /proc: orphans, setsid'ed ones included, are re-parented to the wrapper) and reports the
# candidate's exit on a pipe of its own. The candidate sets its own limits (a preexec_fn in the
# parent is unsafe: JAX runs threads there), runs the program and then the tests, each compiled on
# its own, and writes the nonce (read from stdin, which is then closed) only after the tests end.
_WRAPPER = r"""
import ctypes, os, resource, signal, sys, time

def descendants(root):
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    parent[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = set(), [root]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in found:
                found.add(c)
                todo.append(c)
    return found

def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return

def kill_all():
    me = os.getpid()
    for _ in range(500):
        reap()
        kids = descendants(me)
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)

def user_tasks():
    n, uid = 0, os.getuid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat("/proc/" + entry).st_uid == uid:
                    with open("/proc/%s/stat" % entry, "rb") as f:
                        n += int(f.read().rsplit(b")", 1)[1].split()[17])
            except (OSError, IndexError, ValueError):
                pass
    return n

def candidate(work, mem, cpu, fsize, nproc, done_fd, nonce):
    write = os.write
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    except (ValueError, OSError):
        pass
    code = 1
    try:
        program, tests = (os.path.join(work, n) for n in ("candidate.py", "tests.py"))
        with open(program) as f:
            program_code = compile(f.read(), program, "exec")
        with open(tests) as f:
            tests_code = compile(f.read(), tests, "exec")
        sys.argv = [program]
        env = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(program_code, env)
        exec(tests_code, env)
        write(done_fd, nonce)
        code = 0
    except SystemExit as e:
        sys.stderr.write("SystemExit(%r) before the tests finished\n" % (e.code,))
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)

def main():
    work = sys.argv[1]
    mem, cpu, fsize, nprocs, done_fd, report_fd = (int(x) for x in sys.argv[2:8])
    nonce = sys.stdin.buffer.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
    nproc = user_tasks() + nprocs
    pid = os.fork()
    if pid == 0:
        os.close(report_fd)
        candidate(work, mem, cpu, fsize, nproc, done_fd, nonce)
    nonce = None
    os.close(done_fd)

    def stop(signum, frame):
        kill_all()
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
    _, status = os.waitpid(pid, 0)
    kill_all()
    if os.WIFSIGNALED(status):
        os.write(report_fd, b"signal %d\n" % os.WTERMSIG(status))
    else:
        os.write(report_fd, b"exit %d\n" % os.WEXITSTATUS(status))

main()
"""
_KEEP_STDERR = 64 * 2**10  # bytes of the candidate's stderr kept (the tail)
_KEEP_PIPE = 4096  # bytes kept of the nonce and report pipes
_DRAIN_S = 0.5  # after the wrapper exits, how long to wait for the pipes' last bytes


def run_program(
    program: str,
    tests: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_mb: int = 16,
    max_processes: int = 64,
) -> ExecResult:
    """Run `program`, then `tests`, in a fresh Python process with resource limits.

    Args:
      program: candidate source (e.g. a generated function).
      tests: source run after the program in the same namespace (e.g. asserts, or HumanEval's
        check(entry_point)); compiled separately, so the program cannot swallow it.
      timeout_s: wall-clock limit; CPU time is limited to the same number of seconds (rounded up).
      memory_mb: address-space limit of the candidate process (and of each process it starts).
      max_output_mb: largest file the candidate may write.
      max_processes: processes and threads the candidate may add to the user's count (RLIMIT_NPROC;
        not enforced for root).

    Returns:
      ExecResult; passed only when the tests ran to their end (see the module docstring) and the
      candidate exited with status 0, in time. A timeout or a memory error is a failure with its own
      status. stdout is discarded; `detail` is the end of stderr. Every process the program started is
      killed before this returns.
    """
    nonce = secrets.token_hex(16).encode()
    token = secrets.token_hex(16)  # marks every process of this run (see _sweep)
    with tempfile.TemporaryDirectory(prefix="hm3jax_exec_") as work:
        for name, text in (("candidate.py", program), ("tests.py", tests)):
            with open(os.path.join(work, name), "w") as f:
                f.write(text + "\n")
        limits = [str(memory_mb * 2**20), str(max(1, math.ceil(timeout_s))), str(max_output_mb * 2**20),
                  str(max_processes)]
        done_r, done_w = os.pipe()
        report_r, report_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WRAPPER, work, *limits, str(done_w), str(report_w)],
                cwd=work,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # A bare environment; one BLAS thread keeps numpy's per-thread buffers under the limit.
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1",
                     _TOKEN_VAR: token},
                # Own session and process group: the last-resort kill reaches the whole group.
                start_new_session=True,
                pass_fds=(done_w, report_w),
            )
        finally:
            os.close(done_w)
            os.close(report_w)
        try:
            proc.stdin.write(nonce + b"\n")
            proc.stdin.close()
        except OSError:
            pass
        err_fd = proc.stderr.fileno()
        try:
            timed_out, out = _collect(proc, {err_fd: _KEEP_STDERR, done_r: _KEEP_PIPE, report_r: _KEEP_PIPE},
                                      time.monotonic() + timeout_s)
        finally:
            _finish(proc, token)
            os.close(done_r)
            os.close(report_r)
            proc.stderr.close()
    if timed_out:
        return ExecResult(False, "timeout", f"no exit within {timeout_s} s")
    err_text = bytes(out[err_fd]).decode("utf-8", "replace")
    tail = err_text[-2000:]
    report = bytes(out[report_r]).decode("ascii", "replace").split()
    kind, code = (report[0], int(report[1])) if len(report) == 2 and report[1].isdigit() else ("lost", -1)
    if kind == "exit" and code == 0:
        if bytes(out[done_r]) == nonce:
            return ExecResult(True, "passed", "")
        return ExecResult(False, "failed", "the program exited with status 0 before the tests finished")
    if "MemoryError" in err_text:
        return ExecResult(False, "memory", tail)
    if kind == "signal" and code in (signal.SIGXCPU, signal.SIGKILL):
        return ExecResult(False, "timeout", f"killed by signal {code} (CPU limit)")
    if kind == "lost":
        return ExecResult(False, "failed", "the sandbox wrapper ended without a report (killed?)\n" + tail)
    return ExecResult(False, "failed", tail)


def _collect(proc: subprocess.Popen, keep: dict[int, int], deadline: float) -> tuple[bool, dict]:
    """Read the pipes until they close, the wrapper has exited (plus a short drain) or the deadline.

    Keeps the last `keep[fd]` bytes of stderr and the first `keep[fd]` of the other pipes, so the
    memory used is bounded whatever the program prints. Returns (timed out, {fd: bytes kept}).
    """
    out = {fd: bytearray() for fd in keep}
    stderr_fd = proc.stderr.fileno()
    sel = selectors.DefaultSelector()
    for fd in keep:
        sel.register(fd, selectors.EVENT_READ)
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True, out
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > _DRAIN_S:
                    break
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = out[key.fd]
                if key.fd == stderr_fd:
                    buf += chunk
                    if len(buf) > keep[key.fd]:
                        del buf[:len(buf) - keep[key.fd]]
                elif len(buf) < keep[key.fd]:
                    buf += chunk[:keep[key.fd] - len(buf)]
    finally:
        sel.close()
    return False, out


def _finish(proc: subprocess.Popen, token: str) -> None:
    """Make sure the wrapper and everything it started are gone: the wrapper kills the candidate's
    descendants on SIGTERM (a stopped wrapper is continued first); the process group is killed if it
    does not exit at once; then every process of the run still alive is found and killed from here
    (_sweep), which reaches descendants of a wrapper that was killed or stopped by the program."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        except OSError:
            pass
    _kill_group(proc)
    _sweep(token, proc.pid)
    proc.wait()


_TOKEN_VAR = "HM3JAX_SANDBOX_RUN"


def _run_processes(token: str, root: int) -> set[int]:
    """Live (not zombie) processes of one run: those whose environment holds `token`, the wrapper
    `root`, and every descendant of either (by parent pid). This process is never among them."""
    marker = f"{_TOKEN_VAR}={token}".encode()
    parent, marked = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] in (b"Z", b"X"):
                continue
            parent[pid] = int(fields[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    marked.add(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone, or another user's
    found = marked | ({root} if root in parent else set())
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    todo = list(found)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in found:
                found.add(c)
                todo.append(c)
    found.discard(os.getpid())
    return found


def _sweep(token: str, root: int, rounds: int = 200) -> None:
    """SIGKILL every process of the run until none is left (a forking program may add some while
    the first ones die); SIGKILL also ends stopped processes."""
    if not os.path.isdir("/proc"):
        return
    for _ in range(rounds):
        pids = _run_processes(token, root)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
