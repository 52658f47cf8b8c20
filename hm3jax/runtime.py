"""Process-level settings that make XLA:CPU programs faster on Linux.

XLA:CPU allocates every output buffer afresh, and glibc serves large buffers with fresh anonymous
memory, so each call page-faults its outputs in again, 4 KiB at a time. For memory-bound programs
(parameter merges, elementwise updates of large pytrees) those faults can cost more than the
arithmetic; 2 MiB transparent huge pages make them 512 times rarer (measurements: benchmarks/README.md).

glibc (>= 2.35) asks the kernel for transparent huge pages when the tunable `glibc.malloc.hugetlb=1`
is set, but reads tunables only at process start. `reexec_with_huge_pages` therefore re-executes the
current command once with that tunable added; hm3jax's command-line tools call it first thing.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
DISABLE_ENV = "HM3JAX_NO_HUGE_PAGES"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_wanted() -> bool:
    """Whether re-executing with glibc's huge-page tunable would change anything here."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV):
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # already set (by us or by the user)
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    if lib != "glibc" or (major, minor) < (2, 35):
        return False
    return _thp_mode() == "madvise"  # "always": every mapping already gets them; "never": no use


def reexec_with_huge_pages() -> None:
    """Re-execute this command with GLIBC_TUNABLES asking malloc for transparent huge pages.

    Does nothing (returns) where it would not help: not Linux/glibc >= 2.35, the kernel's THP mode is
    not "madvise", the tunable is already set, or HM3JAX_NO_HUGE_PAGES is set. Otherwise it does not
    return: the same interpreter runs the same command line (`sys.orig_argv`) with the tunable added.
    Call it before any work (it restarts the process).
    """
    if not huge_pages_wanted():
        return
    env = dict(os.environ)
    old = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{old}:{TUNABLE}" if old else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
