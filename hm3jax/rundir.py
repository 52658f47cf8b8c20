"""The run directory: its config.yaml (a new run writes it, a later run with the same output directory
resumes only when its resolved config is the same, log settings aside) and its lock (one process
at a time works in a run directory).

The lock is RUN_DIR/.hm3jax.lock, holding the owner's pid and host; the exclusion itself is an
flock on that file, which the kernel drops when the owner dies, so the lock of a killed run is
taken over by the next one without any stale-lock guessing. Where flock is unavailable (some
network file systems), the file is created exclusively and a lock whose pid is dead on this host
is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile

import draccus

from hm3jax.config import CONFIG_FILE, RunConfig, RunConfigError, load_run_config, to_yaml

# Keys that do not change a run's results: a run directory may be resumed with other values.
# output_dir is where config.yaml itself lies, so it always names this directory, however it is
# spelled now (relative, through a link) or wherever the directory was moved since.
_NOT_COMPARED = ("log", "mesh", "output_dir")
LOCK_FILE = ".hm3jax.lock"


class RunDirBusyError(RunConfigError):
    """Another live process holds the run directory's lock."""


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _compared(cfg: RunConfig) -> dict:
    flat = _flat(json.loads(json.dumps(draccus.encode(cfg))))
    return {k: v for k, v in flat.items() if k.split(".")[0] not in _NOT_COMPARED}


def check_run_dir(cfg: RunConfig) -> bool:
    """Whether `cfg.output_dir` holds a run of this same (resolved) config, to be resumed.

    Returns False when the directory is missing or empty (a new run), True when its config.yaml
    equals `cfg` (log settings aside). Raises RunConfigError naming the file and the differing keys
    when it was made by another config, or when it is a non-empty directory without config.yaml.
    """
    out = cfg.output_dir
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise RunConfigError(f"output_dir {out} exists and is not a directory")
    path = os.path.join(out, CONFIG_FILE)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise RunConfigError(f"{path} is not a regular file; output_dir {out} is not a usable run directory")
    if not os.path.isfile(path):
        if [e for e in os.listdir(out) if e != LOCK_FILE]:
            raise RunConfigError(f"output_dir {out} is not empty and has no {CONFIG_FILE}: not an hm3jax "
                                 "run directory; choose another output_dir")
        return False
    try:
        old = load_run_config(path)
    except RunConfigError as e:
        raise RunConfigError(f"{path}: cannot be read as a run config ({e}); choose another output_dir") from None
    a, b = _compared(old), _compared(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} now" for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunConfigError(f"{path} was made by a different config: {shown}{more}. Use another "
                             "output_dir, or the same config to resume that run")
    return True


def prepare_run_dir(cfg: RunConfig) -> bool:
    """Create `cfg.output_dir` with its config.yaml (written atomically) unless it holds this run.

    `cfg` must be validated. Returns True when an existing run of the same config is resumed.
    """
    if check_run_dir(cfg):
        return True
    os.makedirs(cfg.output_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cfg.output_dir, prefix=f".{CONFIG_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, os.path.join(cfg.output_dir, CONFIG_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return False


def discard_new_run_dir(cfg: RunConfig, existed: bool) -> None:
    """Undo `prepare_run_dir` for a new run that failed before it wrote anything else: remove its
    config.yaml, and the directory too when this run created it. A directory holding anything more
    (a stage checkpoint, metrics) is left alone, to be resumed."""
    out = cfg.output_dir
    try:
        left = sorted(e for e in os.listdir(out) if e != LOCK_FILE)
        if left not in ([CONFIG_FILE], []):
            return
        for name in (CONFIG_FILE, LOCK_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, name))
        if not existed:
            os.rmdir(out)
    except OSError:
        pass  # best effort: the run's own error is the one to report


# ------------------------------------------------------------------------------------ the lock
def _host() -> str:
    return socket.gethostname()


def _owner(path: str) -> tuple[int | None, str]:
    """(pid, host) written in a lock file (None, "") when unreadable or empty."""
    try:
        with open(path) as f:
            parts = f.read(200).split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


class RunDirLock:
    """The lock of one run directory, held by this process from `acquire` to `release`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd: int | None = None
        self._exclusive_file = False

    def _busy(self, pid: int | None, host: str) -> RunDirBusyError:
        who = f"process {pid}" + (f" on {host}" if host and host != _host() else "") if pid else "another process"
        return RunDirBusyError(f"output_dir {self.run_dir} is in use by {who} (lock file {self.path}); wait "
                               "for that run to end or stop it, or choose another output_dir")

    def acquire(self) -> RunDirLock:
        """Take the lock (creating the run directory when missing). Raises RunDirBusyError when a
        live process holds it."""
        os.makedirs(self.run_dir, exist_ok=True)
        # loaded where used: rundir is read by JAX-free entry points (hm3jax.io loads JAX; fcntl is Unix-only)
        import fcntl

        existed = os.path.lexists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._busy(*_owner(self.path)) from None
            if not existed:  # created just now for flock: the exclusive-create lock makes its own
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            return self._acquire_exclusive()  # no flock here (ENOLCK, EOPNOTSUPP, ...)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {_host()}\n".encode())
        self._fd = fd
        return self

    def _acquire_exclusive(self) -> RunDirLock:
        # loaded where used: rundir is read by JAX-free entry points (hm3jax.io loads JAX; fcntl is Unix-only)
        from hm3jax.io.atomic import pid_alive

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, host = _owner(self.path)
                if pid is not None and host == _host() and not pid_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)  # a dead run's lock: take it over
                    continue
                raise self._busy(pid, host) from None
            os.write(fd, f"{os.getpid()} {_host()}\n".encode())
            os.close(fd)
            self._exclusive_file = True
            return self
        raise self._busy(*_owner(self.path))

    def release(self) -> None:
        """Give the lock up (the file stays, emptied, unless it was an exclusive-create lock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        elif self._exclusive_file:
            with contextlib.suppress(OSError):
                if _owner(self.path)[0] == os.getpid():
                    os.remove(self.path)
            self._exclusive_file = False

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
