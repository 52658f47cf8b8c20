"""How mergeable a zoo is: parameter-level merges of its experts and single-layer swaps between them.

HM3 needs experts whose task vectors combine (the upper level) and whose layers are interchangeable
enough that a path through several models' layers still computes something (the lower level). The
probe measures both on the held-out split, and `targets` checks them against the config's targets:
- each method of hm3jax.search.upper (task arithmetic, TIES, DARE-TIES) merged at the centre
  preference and at one preference leaning to each task (`probe_lean` on it, the rest shared);
- each expert with its middle layer swapped for the same layer of every other expert and of the
  best centre merge, scored on the expert's own task.
All of them are scored by one compiled program, vmapped over a stack of their params (the zoo's
models are small, so the stack is too); each method's merges take a small program of their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hm3jax.models.config import ModelConfig
from hm3jax.objectives.batch import make_suite_batch
from hm3jax.objectives.scoring import make_params_scorer
from hm3jax.objectives.synthetic import TASK_NAMES
from hm3jax.settings import BASE, MERGE  # the centre merge is named as in a path
from hm3jax.zoo.config import ZooConfig

_SCORE_CHUNK = 8  # models scored at once


def probe_preferences(zc: ZooConfig) -> dict[str, np.ndarray]:
    """{"centre": uniform weights, task name: weights leaning `probe_lean` to that task}."""
    k = len(TASK_NAMES)
    prefs = {"centre": np.full(k, 1.0 / k, np.float32)}
    for i, name in enumerate(TASK_NAMES):
        w = np.full(k, (1.0 - zc.probe_lean) / (k - 1), np.float32)
        w[i] = zc.probe_lean
        prefs[name] = w
    return prefs


def probe_mergeability(cfg: ModelConfig, models: dict[str, dict], zc: ZooConfig, tokenizer,
                       key: jax.Array) -> dict:
    """Held-out exact match of the zoo's merges and layer swaps (the probe of `score_zoo`).

    Returns:
      {"merges": {method: {preference name: {task: exact match}}}, "preferences": {name: weights},
       "best_centre_method": the method whose centre merge has the highest worst-task score,
       "swap_layer": the swapped layer, "swaps": {expert: {donor: exact match on its own task}}}.
    """
    return score_zoo(cfg, models, zc, tokenizer, key)[1]


def score_zoo(cfg: ModelConfig, models: dict[str, dict], zc: ZooConfig, tokenizer,
              key: jax.Array) -> tuple[dict[str, dict[str, float]], dict]:
    """Held-out exact match of the zoo's models, and its mergeability probe, in one compiled program.

    Args:
      cfg: the zoo's architecture; models: {"base" | task name: params}.
      zc: the zoo config (probe settings); tokenizer: the zoo's tokenizer.
      key: PRNG key of DARE's drop masks.

    Returns:
      ({model name: {task: exact match}}, the probe: see `probe_mergeability`).
    """
    # the search package (flax, optax) loads only when the probe runs, not with hm3jax.zoo
    from hm3jax.search.upper import UPPER_METHODS, merge_for_preference

    k, n_layers = len(TASK_NAMES), zc.num_hidden_layers
    mid = n_layers // 2
    batch = make_suite_batch(zc.suite(), "heldout", tokenizer)
    base, experts = models[BASE], [models[t] for t in TASK_NAMES]
    prefs = probe_preferences(zc)
    lams = jnp.asarray(np.stack(list(prefs.values())))

    # Each method's merges for every preference, stacked on a leading axis (a small program per
    # method, no forward pass in it); models are arguments, not closed-over constants, so XLA does
    # not fold them.
    merged = {}
    for method in UPPER_METHODS:
        @jax.jit
        def merge_all(lams, base, experts, method=method):
            return jax.vmap(lambda lam: merge_for_preference(
                method, base, experts, lam, key, zc.probe_density, zc.probe_scale))(lams)
        merged[method] = merge_all(lams, base, experts)

    # Every expert with its middle layer swapped for each other expert's and each centre merge's.
    # Only the best centre merge's swaps are reported; the other two merges' are scored and dropped,
    # which costs less than compiling a second program once the best method is known.
    def swapped(expert, donor):
        # jnp.asarray: experts trained in worker processes come back as numpy arrays
        layers = jax.tree.map(lambda e, d: jnp.asarray(e).at[mid].set(d[mid]),
                              expert["layers"], donor["layers"])
        return {**expert, "layers": layers}

    centre = {m: jax.tree.map(lambda x: x[0], merged[m]) for m in UPPER_METHODS}  # "centre" is first
    swap_keys, swap_params = [], []
    for i, name in enumerate(TASK_NAMES):
        donors = [(t, models[t]) for t in TASK_NAMES if t != name] + [(m, centre[m]) for m in UPPER_METHODS]
        for donor, params in donors:
            swap_keys.append((i, donor))
            swap_params.append(swapped(experts[i], params))

    # One compiled program scores all of them: the models, the merges and the swaps in one stack,
    # `_SCORE_CHUNK` models at a time (vmapped), which bounds the activations a larger zoo config
    # would hold at once.
    score = make_params_scorer(cfg, batch, k)
    score_all = jax.jit(lambda stack: jax.lax.map(score, stack, batch_size=_SCORE_CHUNK))

    names = list(models)
    stack = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                         jax.tree.map(lambda *xs: jnp.stack(xs), *(models[n] for n in names)),
                         *[merged[m] for m in UPPER_METHODS],
                         jax.tree.map(lambda *xs: jnp.stack(xs), *swap_params))
    rows = np.asarray(score_all(stack))
    scores = {n: dict(zip(TASK_NAMES, map(float, row))) for n, row in zip(names, rows)}
    rows = rows[len(names):]
    n_prefs = len(prefs)
    merges = {m: {p: dict(zip(TASK_NAMES, map(float, rows[j * n_prefs + q]))) for q, p in enumerate(prefs)}
              for j, m in enumerate(UPPER_METHODS)}
    best = max(UPPER_METHODS, key=lambda m: min(merges[m]["centre"].values()))
    swap_rows = rows[len(UPPER_METHODS) * n_prefs:]
    swaps: dict[str, dict[str, float]] = {name: {} for name in TASK_NAMES}
    for (i, donor), row in zip(swap_keys, swap_rows):
        if donor in TASK_NAMES or donor == best:
            swaps[TASK_NAMES[i]][MERGE if donor == best else donor] = float(row[i])
    return scores, {"merges": merges, "preferences": {p: w.tolist() for p, w in prefs.items()},
            "best_centre_method": best, "swap_layer": mid, "swaps": swaps}


def targets(scores: dict[str, dict[str, float]], probe: dict, zc: ZooConfig) -> dict[str, bool]:
    """Which of the config's targets the zoo meets (held-out exact match).

    expert_own_task: every expert >= min_expert_exact_match on its task.
    expert_off_task: every expert at least min_off_task_gap weaker on each other task.
    base_weak: the base <= max_base_exact_match on every task.
    merge_centre: some method's centre merge >= min_merge_exact_match on every task AND above the
      base on every task (less merge_tolerance).
    layer_swap: every single-layer swap keeps its expert >= min_swap_exact_match on its own task.
    """
    base = scores[BASE]
    centre_ok = [all(v >= zc.min_merge_exact_match and v > base[t] - zc.merge_tolerance
                     for t, v in m["centre"].items())
                 for m in probe["merges"].values()]
    return {
        "expert_own_task": all(scores[t][t] >= zc.min_expert_exact_match for t in TASK_NAMES),
        "expert_off_task": all(scores[t][o] <= scores[t][t] - zc.min_off_task_gap
                               for t in TASK_NAMES for o in TASK_NAMES if o != t),
        "base_weak": all(v <= zc.max_base_exact_match for v in base.values()),
        "merge_centre": any(centre_ok),
        "layer_swap": all(v >= zc.min_swap_exact_match
                          for row in probe["swaps"].values() for v in row.values()),
    }


def format_report(manifest: dict) -> str:
    """The build's summary: held-out exact match of the models and merges, the swaps, the targets."""
    names = list(manifest["tasks"])
    rows = dict(manifest["heldout_exact_match"])
    probe = manifest["probe"]
    for method, by_pref in probe["merges"].items():
        for pref, row in by_pref.items():
            rows[f"{method} @ {pref}"] = row
    width = max(map(len, list(rows) + ["model"]))
    lines = ["held-out exact match (teacher-forced); merges at the centre preference and leaning "
             f"{manifest['config']['probe_lean']} to one task",
             f"{'model':<{width}}  " + "  ".join(f"{n:>11}" for n in names)]
    for model, row in rows.items():
        lines.append(f"{model:<{width}}  " + "  ".join(f"{row[n]:>11.3f}" for n in names))
    lines.append(f"layer-swap probe (layer {probe['swap_layer']}; expert's own task, donor in brackets):")
    for expert, row in probe["swaps"].items():
        lines.append(f"  {expert:<11} " + "  ".join(f"[{d}] {v:.3f}" for d, v in row.items()))
    lines.append("targets: " + ", ".join(f"{t} {'met' if ok else 'NOT met'}"
                                         for t, ok in manifest["targets"].items()))
    return "\n".join(lines)
