"""`python -m hm3jax.train --help` and its config errors: every dotted key (config_keys), the
nearest known key for a misspelt one (suggest_key), and draccus's help without its per-section
"Config file for X" options and with a run's defaults (tidy_help). No JAX import, and no import of
hm3jax.config either: it passes its RunConfig in (config imports this module, never the reverse)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing


def _section_class(hint):
    """The dataclass a field's type hint names (`ZooSource | None` -> ZooSource), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def config_keys(config_class: type) -> list[str]:
    """Every dotted key of a config dataclass (RunConfig: `upper.density`, `lower.ppo.lr`, ...):
    a field whose default or type is a dataclass (an optional section included) is walked into."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            sub = type(default) if dataclasses.is_dataclass(default) else _section_class(hints.get(f.name))
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)

    walk(config_class, "")
    return out


def suggest_key(message: str, config_class: type) -> str:
    """draccus's "unrecognized arguments: --upper.methd x" with the nearest key of `config_class`."""
    if "unrecognized arguments:" not in message:
        return message
    unknown = [a[2:].split("=")[0] for a in message.split("unrecognized arguments:", 1)[1].split()
               if a.startswith("--")]
    keys = config_keys(config_class)
    hints = [f"--{u}: did you mean --{m[0]}?" for u in unknown
             if (m := difflib.get_close_matches(u, keys, n=1, cutoff=0.6))]
    return f"{message} ({'; '.join(hints)})" if hints else f"{message} (see --help for the keys)"


def tidy_help(parser, defaults) -> None:
    """--help without draccus's per-section "Config file for X" options (each listed twice), with
    each option's default read from `defaults` (a whole config, e.g. RunConfig(): a run's defaults);
    the verbosity flags of hm3jax.train, which it takes before the config, in the epilog."""
    groups = [parser._actions] + [g._group_actions for g in parser._action_groups]  # draccus keeps
    for actions in groups:  # an overridden option in its group, for the help: both are hidden
        for action in actions:
            if (action.help or "").startswith("Config file for "):
                action.help = argparse.SUPPRESS
    for actions in groups:
        for action in actions:
            key = next((o[2:] for o in action.option_strings if o.startswith("--")), None)
            value, found = defaults, key is not None
            for part in (key or "").split("."):
                if not found or not dataclasses.is_dataclass(value) or not hasattr(value, part):
                    found = False
                    break
                value = getattr(value, part)
            if found and not dataclasses.is_dataclass(value):
                action.default = value
    parser.epilog = ("Also: -v/--verbose (debug messages with time stamps), -q/--quiet (warnings and errors "
                     "only). A section can be read from its own YAML file: --lower FILE, --lower.ppo FILE.")
