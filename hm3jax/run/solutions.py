"""A run's results as solution records (run.record.Solution): paths described by model name, the
upper level's settings per preference, and each solution's cost."""

from __future__ import annotations

import jax
import numpy as np

from hm3jax.cost import path_cost
from hm3jax.run.context import Context, merge_keys, upper_methods
from hm3jax.run.record import Solution, UpperSettings
from hm3jax.settings import BASE, MERGE


def describe_path(ctx: Context, local_path: np.ndarray, merged_name: str) -> list[tuple[str, int]]:
    """(model name, layer) pairs of a local path (experts by task name; the merged block by
    `merged_name`), stopping at STOP / the end."""
    L, K = ctx.model_cfg.num_hidden_layers, len(ctx.tasks)
    out = []
    for a in np.asarray(local_path).tolist():
        if a < 0 or a >= (K + 1) * L:
            break
        out.append((ctx.tasks[a // L], a % L) if a < K * L else (merged_name, a - K * L))
    return out


def solutions(ctx: Context, stage: dict, heldout: np.ndarray, merged_name: str, upper_out: dict | None,
              with_upper: bool = True) -> list[Solution]:
    """A path search's solutions, one per preference: its best paths (`stage`: the search's stage
    result), their held-out scores, and the upper level's merge of each preference (`upper_out`:
    the upper stage's result; none with `with_upper` False)."""
    recs = []
    seq = ctx.cfg.front.cost_seq_len
    keys = merge_keys(ctx)
    methods = upper_methods(ctx, upper_out)
    for i, pref in enumerate(ctx.prefs):
        path = describe_path(ctx, stage["path"][i], merged_name)
        up = None
        if with_upper and upper_out is not None:
            k = keys[i]
            up = UpperSettings(method=methods[i], density=upper_out["density"][i], scale=upper_out["scale"][i],
                               seed=ctx.cfg.seed, key_data=jax.random.key_data(k))
        recs.append(Solution(pref, up, path, merged_name, stage["search"][i], heldout[i],
                             path_cost(ctx.model_cfg, path, seq),
                             aligned="align" in stage and switches_models(path, merged_name)))
    return recs


def switches_models(path, shell: str) -> bool:
    """Whether a described path ever runs a layer of another model than the one before it (the
    shell's model before the first layer): the steps where alignment maps apply."""
    prev = shell
    for step in path:
        if step is not None:
            if step[0] != prev:
                return True
            prev = step[0]
    return False


def identity_solutions(ctx: Context, search: np.ndarray, heldout: np.ndarray, upper_out: dict | None,
                       method: str) -> list[Solution]:
    """Parameter-level merges as solutions: the identity path over the merged model."""
    L, seq = ctx.model_cfg.num_hidden_layers, ctx.cfg.front.cost_seq_len
    path = [(MERGE, layer) for layer in range(L)]
    recs = []
    methods = upper_methods(ctx, upper_out) if upper_out is not None else [method] * len(ctx.prefs)
    for i, pref in enumerate(ctx.prefs):
        up = UpperSettings(method=methods[i],
                           density=upper_out["density"][i] if upper_out else ctx.cfg.upper.density,
                           scale=upper_out["scale"][i] if upper_out else ctx.cfg.upper.scale, seed=ctx.cfg.seed)
        recs.append(Solution(pref, up, path, MERGE, search[i], heldout[i], path_cost(ctx.model_cfg, path, seq)))
    return recs


def reference_records(ctx: Context, ref: dict) -> dict[str, Solution]:
    """Solution records of the base and each expert (their own identity paths)."""
    L, seq, k = ctx.model_cfg.num_hidden_layers, ctx.cfg.front.cost_seq_len, len(ctx.tasks)
    out = {}
    for i, name in enumerate((BASE,) + tuple(ctx.tasks)):
        path = [(name, layer) for layer in range(L)]
        pref = [1.0 / k] * k if name == BASE else [float(t == name) for t in ctx.tasks]
        out[name] = Solution(pref, None, path, name, ref["search"][i], ref["heldout"][i],
                             path_cost(ctx.model_cfg, path, seq))
    return out
