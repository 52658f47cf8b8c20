"""`python -m hm3jax.train --help` and its config errors: every dotted key (config_keys), the
nearest known key for a misspelt one (suggest_key), and draccus's help without its per-section
"Config file for X" options and with a run's defaults (tidy_help). No JAX import."""

from __future__ import annotations

import dataclasses


def config_keys() -> list[str]:
    """Every dotted key of RunConfig (`upper.density`, `lower.ppo.lr`, ...)."""
    from hm3jax.config import CheckpointSource, RunConfig, ZooSource

    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            t = f.type if not isinstance(f.type, str) else None
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            sub = type(default) if dataclasses.is_dataclass(default) else t if dataclasses.is_dataclass(t) else None
            if sub is None and f.name in ("zoo", "checkpoints"):
                sub = ZooSource if f.name == "zoo" else CheckpointSource
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)

    walk(RunConfig, "")
    return out


def suggest_key(message: str) -> str:
    """draccus's "unrecognized arguments: --upper.methd x" with the nearest known key."""
    import difflib

    if "unrecognized arguments:" not in message:
        return message
    unknown = [a[2:].split("=")[0] for a in message.split("unrecognized arguments:", 1)[1].split()
               if a.startswith("--")]
    keys = config_keys()
    hints = [f"--{u}: did you mean --{m[0]}?" for u in unknown
             if (m := difflib.get_close_matches(u, keys, n=1, cutoff=0.6))]
    return f"{message} ({'; '.join(hints)})" if hints else f"{message} (see --help for the keys)"


def tidy_help(parser) -> None:
    """--help without draccus's per-section "Config file for X" options (each listed twice); the
    verbosity flags of hm3jax.train, which it takes before the config, in the epilog."""
    import argparse

    from hm3jax.config import RunConfig

    groups = [parser._actions] + [g._group_actions for g in parser._action_groups]  # draccus keeps
    for actions in groups:  # an overridden option in its group, for the help: both are hidden
        for action in actions:
            if (action.help or "").startswith("Config file for "):
                action.help = argparse.SUPPRESS
    run = RunConfig()  # the defaults of a run (DEFAULT_UPPER, DEFAULT_LOWER), not of the bare sections
    for actions in groups:
        for action in actions:
            key = next((o[2:] for o in action.option_strings if o.startswith("--")), None)
            value, found = run, key is not None
            for part in (key or "").split("."):
                if not found or not dataclasses.is_dataclass(value) or not hasattr(value, part):
                    found = False
                    break
                value = getattr(value, part)
            if found and not dataclasses.is_dataclass(value):
                action.default = value
    parser.epilog = ("Also: -v/--verbose (debug messages with time stamps), -q/--quiet (warnings and errors "
                     "only). A section can be read from its own YAML file: --lower FILE, --lower.ppo FILE.")
