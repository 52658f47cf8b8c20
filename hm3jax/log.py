"""Logging of the command-line tools: the stdlib `logging` under the "hm3jax" logger, on stderr.

Every CLI takes `-v/--verbose` (debug lines, with a time stamp) and `-q/--quiet` (warnings and
errors only); by default progress and status lines are shown as plain messages. Results a command
was asked for (a table, a JSON record) go to stdout and are not affected.

    parser = argparse.ArgumentParser(...); add_verbosity_flags(parser)
    args = parser.parse_args(argv); setup_logging(args.verbose, args.quiet)
    log = logging.getLogger(__name__); log.info("[stage] done (3.1s)")
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

ROOT = "hm3jax"
VERBOSE_FLAGS = ("-v", "--verbose")
QUIET_FLAGS = ("-q", "--quiet")


def add_verbosity_flags(parser: argparse.ArgumentParser, verbose_help: str | None = None) -> None:
    """Add -v/--verbose and -q/--quiet to an argparse parser (dest: verbose, quiet)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(*VERBOSE_FLAGS, dest="verbose", action="store_true",
                       help=verbose_help or "show debug messages too, with time stamps")
    group.add_argument(*QUIET_FLAGS, dest="quiet", action="store_true",
                       help="show only warnings and errors (results still go to stdout)")


def pop_verbosity_flags(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(argv without -v/--verbose/-q/--quiet, verbose, quiet): for a parser that cannot take them
    (the draccus config of hm3jax.train)."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS + QUIET_FLAGS]
    return rest, any(a in VERBOSE_FLAGS for a in argv), any(a in QUIET_FLAGS for a in argv)


def setup_logging(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """Configure the "hm3jax" logger for a CLI: INFO as plain lines (default), DEBUG with times
    (verbose), WARNING and above (quiet); one stderr handler, set again on each call."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_hm3jax", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(_PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    return logger


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is emitted (so a redirected or
    captured stderr gets the lines)."""

    _hm3jax = True

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors prefixed with "warning: " / "error: "."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg
