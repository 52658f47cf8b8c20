"""Reading a run config with draccus: a YAML file plus dotted command-line overrides into a
RunConfig (parse_run_config, load_run_config), the parser and its `--help` (run_config_parser,
help_text), and the config back as YAML (to_yaml). A malformed key or value is a RunConfigError
naming it; nothing here checks more than the types and the sections' own checks (see validation)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import draccus
import draccus.argparsing

from hm3jax.config.schema import RunConfig, RunConfigError
from hm3jax.confighelp import suggest_key, tidy_help


def _draccus_message(e: BaseException) -> str:
    """The message of a parse error: a section's own check (e.g. UpperConfig's, chained by draccus
    under "Couldn't instantiate class ...") alone; else draccus's message with its causes."""
    parts = [str(e)]
    cause = e.__cause__
    while cause is not None:
        parts.append(str(cause))
        cause = cause.__cause__
    if len(parts) > 1 and parts[0].startswith("Couldn't instantiate class") and parts[-1]:
        return parts[-1]
    return ": ".join(p for p in parts if p)


def run_config_parser(config_path: str | os.PathLike | None = None,
                      prog: str = "python -m hm3jax.train") -> draccus.argparsing.ArgumentParser:
    """draccus's parser of RunConfig (reading `config_path` when the arguments give no --config_path),
    its help tidied by confighelp.tidy_help with a run's defaults (RunConfig())."""
    parser = draccus.argparsing.ArgumentParser(config_class=RunConfig, config_path=config_path, exit_on_error=False,
                                               prog=prog)
    tidy_help(parser.parser, RunConfig())
    return parser


def help_text(prog: str = "python -m hm3jax.train") -> str:
    """The text `python -m hm3jax.train --help` prints: every dotted key, its doc string and its default."""
    return run_config_parser(prog=prog).parser.format_help()


def parse_run_config(args: Sequence[str] | None = None, config_path: str | os.PathLike | None = None,
                     prog: str = "python -m hm3jax.train") -> RunConfig:
    """Parse `args` (`--config_path FILE`, dotted overrides; default sys.argv[1:]) into a RunConfig.

    `config_path` is the file read when `args` give none. Raises RunConfigError naming the unknown
    or malformed key (and the file); `--help` prints the documented fields and exits.
    """
    args = list(args) if args is not None else None
    where = config_path
    if args is not None and "--config_path" in args:
        i = args.index("--config_path")
        where = args[i + 1] if i + 1 < len(args) else None
    if where is not None and not os.path.isfile(where):
        raise RunConfigError(f"--config_path {where}: no such file")
    try:
        return run_config_parser(config_path, prog).parse_args(args)
    except (draccus.utils.DraccusException, draccus.utils.ParsingError, ValueError, TypeError) as e:
        src = f"{where}: " if where else ""
        raise RunConfigError(f"{src}{suggest_key(_draccus_message(e), RunConfig)}") from None


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The RunConfig of a YAML file (e.g. a run directory's config.yaml), no overrides."""
    return parse_run_config([], config_path=os.fspath(path))


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML, fields in declaration order (what config.yaml holds)."""
    return draccus.dump(cfg, sort_keys=False)
