"""Export a solution (a layer path under one model's shell) as a plain Hugging Face checkpoint.

A path of T steps, each a (model name, layer index) pair, becomes a decoder with T layers: the chosen
layer slices stacked in path order between the embeddings, final norm and head of the `shell` model.
transformers loads it with `AutoModelForCausalLM.from_pretrained`, and its logits are those of
`hm3jax.models.forward_path` on the same path.

Beside the weights the export holds:
  hm3jax_solution.json  the solution record (preference, upper settings, path, shell, scores, cost).
  mergekit_path.yml     a mergekit `passthrough` recipe over the source checkpoints that rebuilds
                        the same tensors; entries of the upper-level merge ("merge") point at the
                        output of the next recipe.
  mergekit_upper.yml    (when the path uses the upper-level merge and its settings are known) the
                        merge's own recipe: task_arithmetic / ties / dare_ties over the base and the
                        experts, the preference as weights, `density`, `lambda` = the scale.
  README.md             how to run the recipes and when they reproduce the export exactly.

Reproduction by mergekit: passthrough copies tensors, so the path recipe is exact. The upper merge is
exact for task arithmetic (up to float rounding); for TIES up to ties between non-zero magnitudes at
the trim threshold (hm3jax's upper level trims by threshold search; such ties do not occur in
practice with float weights); never for DARE-TIES, whose random drop masks mergekit draws itself.
mergekit takes the embeddings from the first slice's model and the final norm and head from the
last slice's, so when the path starts or ends in another model than the shell the recipe adds an
empty slice (`layer_range: [0, 0]`) of the shell model at that end. mergekit accepts such slices;
`python -m hm3jax.merge` refuses them (its recipes need non-empty layer ranges).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import yaml

from hm3jax.io.atomic import atomic_output_dir, check_output_path, check_writable, first_nonfinite
from hm3jax.io.hf import save_pretrained
from hm3jax.io.paths import TOKENIZER_FILES
from hm3jax.models.config import ModelConfig
from hm3jax.models.pool import shell_of
from hm3jax.rundoc import round_floats
from hm3jax.settings import BASE, MERGE

SOLUTION_FILE = "hm3jax_solution.json"
PATH_RECIPE = "mergekit_path.yml"
UPPER_RECIPE = "mergekit_upper.yml"
README_FILE = "README.md"
# Where the README's first command writes the upper-level merge. "./" marks it local for mergekit
# (its model card would otherwise look a bare name up on the Hugging Face hub).
UPPER_OUTPUT = "./upper_merge"


class ExportError(ValueError):
    """A path, shell or model mapping that cannot be exported (the message names the entry)."""


# ------------------------------------------------------------------------------------ pure parts
def _num_layers(params: dict) -> int:
    return int(jax.tree.leaves(params["layers"])[0].shape[0])


def check_path(path: Sequence, layer_counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """The path's (model name, layer) steps, validated; `None` steps (skips) are dropped.

    Args:
      path: a sequence of (model name, layer index) pairs (lists, as read from JSON, are fine) or None.
      layer_counts: {model name: number of layers} of the source models.
    Raises ExportError naming the step: not a pair, unknown model, layer out of range, or no step
    that runs a layer.
    """
    if isinstance(path, (str, bytes)) or not isinstance(path, Sequence):
        raise ExportError(f"path must be a list of (model name, layer) pairs, got {type(path).__name__}")
    steps = []
    for i, step in enumerate(path):
        if step is None:
            continue
        if (isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) != 2
                or not isinstance(step[0], str) or isinstance(step[1], bool)
                or not isinstance(step[1], (int, np.integer))):
            raise ExportError(f"path[{i}] = {step!r}: expected a (model name, layer index) pair")
        name, layer = step[0], int(step[1])
        if name not in layer_counts:
            raise ExportError(f"path[{i}] names model {name!r}, which is not among the source models "
                              f"({', '.join(layer_counts)})")
        if not 0 <= layer < layer_counts[name]:
            raise ExportError(f"path[{i}] = ({name!r}, {layer}): layer out of range; model {name!r} has "
                              f"layers 0..{layer_counts[name] - 1}")
        steps.append((name, layer))
    if not steps:
        raise ExportError("path is empty: a solution must run at least one layer")
    return steps


def path_params(cfg: ModelConfig, models: Mapping[str, dict], path: Sequence,
                shell: str) -> tuple[ModelConfig, dict]:
    """The config and params of the plain T-layer decoder that runs `path` under `shell`'s shell.

    Args:
      cfg: the source models' config (they share one layout; its layer count is replaced).
      models: {name: params pytree}, e.g. {"math": ..., "code": ..., "merge": upper-level merge}.
      path: T (model name, layer) pairs (None steps are skipped, see check_path).
      shell: the model whose embeddings, final norm and head the path runs under.
    Returns (cfg with num_hidden_layers=T, params with layer tensors stacked [T, ...] as numpy).
    """
    if not models:
        raise ExportError("no source models given")
    if shell not in models:
        raise ExportError(f"shell model {shell!r} is not among the source models ({', '.join(models)})")
    steps = check_path(path, {n: _num_layers(p) for n, p in models.items()})
    stacked = jax.tree.map(
        lambda *leaves: np.stack([np.asarray(leaf)[layer] for leaf, (_, layer) in zip(leaves, steps)]),
        *[models[name]["layers"] for name, _ in steps])
    params = {k: jax.tree.map(np.asarray, v) for k, v in shell_of(models[shell]).items()}
    params["layers"] = stacked
    return cfg.replace(num_hidden_layers=len(steps)), params


def check_finite(params: dict) -> None:
    """Raise ExportError naming the first tensor holding NaN or ±Inf (the merge CLI's rule: a
    non-finite weight is never written; e.g. an upper-level merge with an infinite scale)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        floating = np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V"  # ml_dtypes' bfloat16 is "V"
        if floating and not np.isfinite(a).all():
            n = int(a.size - np.isfinite(a).sum())
            raise ExportError(f"tensor {jax.tree_util.keystr(path)} holds {n} NaN/Inf value(s); refusing to "
                              "write non-finite weights (check the solution's upper settings and the source models)")


def _runs(steps: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Maximal runs of consecutive layers of one model, as (model, start, end) half-open ranges."""
    runs: list[list] = []
    for name, layer in steps:
        if runs and runs[-1][0] == name and runs[-1][2] == layer:
            runs[-1][2] += 1
        else:
            runs.append([name, layer, layer + 1])
    return [tuple(r) for r in runs]


def passthrough_recipe(path: Sequence, shell: str, checkpoints: Mapping[str, str],
                       dtype: str = "float32") -> dict:
    """A mergekit passthrough recipe whose output is the exported model of `path` under `shell`.

    Consecutive layers of one model become one slice. When the path does not start (end) in the
    shell model, an empty slice of it is put first (last): mergekit takes the embeddings from the
    first slice's model and the final norm and head from the last slice's.
    """
    steps = [tuple(s) for s in path if s is not None]
    missing = sorted(({n for n, _ in steps} | {shell}) - set(checkpoints))
    if missing:
        raise ExportError(f"no checkpoint directory for model(s) {', '.join(missing)} "
                          f"(checkpoints has {', '.join(checkpoints) or 'none'})")
    slices = [{"sources": [{"model": checkpoints[m], "layer_range": [a, b]}]} for m, a, b in _runs(steps)]
    def edge():  # a fresh dict each time: no YAML anchors in the written recipe
        return {"sources": [{"model": checkpoints[shell], "layer_range": [0, 0]}]}

    if steps[0][0] != shell:
        slices.insert(0, edge())
    if steps[-1][0] != shell:
        slices.append(edge())
    return {"merge_method": "passthrough", "base_model": checkpoints[shell], "dtype": dtype,
            "slices": slices}


def upper_recipe(upper: Mapping[str, Any], preference: Sequence[float], base: str,
                 experts: Sequence[str], dtype: str = "float32") -> dict:
    """The mergekit recipe of the upper-level merge of `hm3jax.search.upper.merge_for_preference`.

    Args:
      upper: {"method": task_arithmetic|ties|dare_ties, "density", "scale"} (a solution's "upper").
      preference: K weights, one per expert (the merge's per-model weights).
      base: the base checkpoint directory; experts: K expert checkpoint directories, in
        preference order.
    """
    method = upper.get("method")
    if method not in ("task_arithmetic", "ties", "dare_ties"):
        raise ExportError(f"upper.method {method!r} has no mergekit recipe here; supported: "
                          "task_arithmetic, ties, dare_ties")
    if len(preference) != len(experts):
        raise ExportError(f"preference has {len(preference)} weights for {len(experts)} experts")
    models = []
    for path, w in zip(experts, preference):
        p: dict[str, Any] = {"weight": float(w)}
        if method != "task_arithmetic":
            p["density"] = float(upper.get("density", 1.0))
        models.append({"model": path, "parameters": p})
    return {"merge_method": method, "base_model": base, "dtype": dtype,
            "parameters": {"lambda": float(upper.get("scale", 1.0))}, "models": models}


_EXACTNESS = {
    "task_arithmetic": "reproduces the upper-level merge exactly (up to float rounding)",
    "ties": "reproduces the upper-level merge exactly unless non-zero task-vector magnitudes tie at "
            "the trim threshold (hm3jax trims by threshold search, mergekit by sort; such ties do not "
            "occur in practice with float weights)",
    "dare_ties": "does NOT reproduce the upper-level merge exactly: DARE drops entries at random and "
                 "mergekit draws other masks than hm3jax (same method and settings, other draw)",
}


def _yaml(recipe: dict, comment: str) -> str:
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return head + yaml.safe_dump(recipe, sort_keys=False)


def _readme(steps, shell: str, has_path: bool, upper: Mapping | None, uses_merge: bool) -> str:
    lines = [f"# hm3jax export: {len(steps)} layers under the shell of `{shell}`", "",
             "Load it with `transformers.AutoModelForCausalLM.from_pretrained(<this directory>)`.",
             f"`{SOLUTION_FILE}` is the solution record (preference, upper-level settings, path, "
             "scores, cost).", "", "Path (step: model, layer):", ""]
    lines += [f"{t}. `{m}` layer {l}" for t, (m, l) in enumerate(steps)]
    lines.append("")
    if not has_path:
        lines.append("No mergekit recipe was written (no checkpoint directories were given).")
        return "\n".join(lines) + "\n"
    lines.append("## Rebuild with mergekit (run from this directory)")
    lines.append("")
    if uses_merge and upper is not None:
        lines += ["```", f"mergekit-yaml {UPPER_RECIPE} {UPPER_OUTPUT}",
                  f"mergekit-yaml {PATH_RECIPE} rebuilt", "```", "",
                  f"The first recipe ({upper.get('method')}) {_EXACTNESS[upper.get('method')]}.",
                  "The second (passthrough) copies layer slices, so it is exact given its inputs."]
    else:
        lines += ["```", f"mergekit-yaml {PATH_RECIPE} rebuilt", "```", "",
                  "The passthrough recipe copies layer slices: it reproduces this model exactly."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ writing
def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def export_path(out_dir: str | os.PathLike, cfg: ModelConfig, models: Mapping[str, dict], path: Sequence,
                shell: str, *, solution: Mapping[str, Any] | None = None,
                checkpoints: Mapping[str, str | os.PathLike] | None = None,
                experts: Sequence[str] | None = None, tokenizer_from: Any = None,
                overwrite: bool = False, dtype: Any = None) -> str:
    """Write the model of `path` under `shell` as an HF checkpoint with its solution record and recipes.

    Args:
      out_dir: the directory to create (all or nothing, see hm3jax.io.atomic_output_dir).
      cfg, models, path, shell: as in path_params. The upper-level merged params go under "merge".
      solution: the solution record written as hm3jax_solution.json (its "path" and "shell", when
        present, must equal `path` and `shell`); its "upper" and "preference" give the upper recipe.
        None writes {"path", "shell"} only.
      checkpoints: {model name: checkpoint directory} of the source models, for the mergekit recipes
        ("base" and the experts for the upper recipe; "merge" is optional and defaults to the
        upper recipe's output directory, `./upper_merge`, relative to the export). None: no recipes.
        The output may not be, contain or lie inside any of these directories.
      experts: expert names in preference order (default: the names in `models` other than
        "base" and "merge", in mapping order).
      tokenizer_from: tokenizer source for save_pretrained (default: the shell model's checkpoint
        directory when `checkpoints` names it and it holds tokenizer files, else the base's; no
        tokenizer when neither has one).
      overwrite: replace an existing `out_dir`.
      dtype: storage dtype (default: each tensor's own).
    Returns the absolute path of the export.
    Raises ExportError (bad path, shell, models, solution), OutputExistsError, UnsafeOutputError,
    UnwritableOutputError (out_dir's directory takes no new files); nothing is written when any is raised.
    """
    ckpts = {n: os.fspath(p) for n, p in (checkpoints or {}).items()}
    if tokenizer_from is None:
        tokenizer_from = next((d for d in (ckpts.get(shell), ckpts.get(BASE)) if d and _has_tokenizer(d)), None)
    inputs = list(ckpts.values()) + ([os.fspath(tokenizer_from)]
                                     if isinstance(tokenizer_from, (str, os.PathLike)) else [])
    check_output_path(out_dir, inputs)
    # the export is staged beside out_dir: its parent must take new files (before any tensor is built)
    target = os.path.abspath(os.fspath(out_dir))
    check_writable(os.path.dirname(target) if os.path.isdir(target) else target, "export output")
    out_cfg, params = path_params(cfg, models, path, shell)  # validates the path
    check_finite(params)
    steps = [(str(s[0]), int(s[1])) for s in path if s is not None]
    record = dict(solution) if solution is not None else {}
    for key, want in (("path", [list(s) for s in steps]), ("shell", shell)):
        if key in record and record[key] is not None:
            got = [list(s) for s in record[key] if s is not None] if key == "path" else record[key]
            if got != want:
                raise ExportError(f"solution[{key!r}] = {record[key]!r} differs from the exported {key} {want!r}")
        record[key] = want
    bad = first_nonfinite(record)
    if bad is not None:
        raise ExportError(f"solution[{bad}]: not a finite number; {SOLUTION_FILE} would not be valid JSON")
    uses_merge = any(m == MERGE for m, _ in steps) or shell == MERGE
    upper = record.get("upper")
    recipes: dict[str, str] = {}
    if checkpoints is not None:
        store = str(out_cfg.torch_dtype if dtype is None else np.dtype(dtype).name)
        if uses_merge and upper is not None:
            names = list(experts) if experts is not None else [n for n in models if n not in (BASE, MERGE)]
            missing = [n for n in [BASE, *names] if n not in ckpts]
            if missing:
                raise ExportError(f"the upper-level recipe needs checkpoint directories for "
                                  f"{', '.join(missing)}; checkpoints has {', '.join(ckpts) or 'none'}")
            if "preference" not in record:
                raise ExportError("solution has 'upper' settings but no 'preference' for the upper recipe")
            recipe = upper_recipe(upper, record["preference"], ckpts[BASE], [ckpts[n] for n in names], store)
            recipes[UPPER_RECIPE] = _yaml(recipe, (
                f"Upper-level merge of hm3jax (method {upper.get('method')}, preference = weights of "
                f"{', '.join(names)}).\nThis recipe {_EXACTNESS[upper.get('method')]}.\n"
                f"Run: mergekit-yaml {UPPER_RECIPE} {UPPER_OUTPUT}"))
        path_ckpts = dict(ckpts)
        if uses_merge:
            path_ckpts.setdefault(MERGE, UPPER_OUTPUT)
        recipe = passthrough_recipe(steps, shell, path_ckpts, store)
        note = (f"\n'{MERGE}' slices read {path_ckpts[MERGE]}: the output of {UPPER_RECIPE} (run it "
                "first, from this directory)." if uses_merge else "")
        recipes[PATH_RECIPE] = _yaml(recipe, (
            f"hm3jax layer path: {len(steps)} layers under the shell of '{shell}' (passthrough).\n"
            "Copies layer slices: exact given its input checkpoints." + note +
            f"\nRun: mergekit-yaml {PATH_RECIPE} OUT_DIR"))
    readme = _readme(steps, shell, checkpoints is not None, upper, uses_merge)

    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        staged = os.path.join(tmp, ".hf")
        save_pretrained(staged, out_cfg, params, tokenizer_from=tokenizer_from, dtype=dtype)
        for name in os.listdir(staged):
            os.rename(os.path.join(staged, name), os.path.join(tmp, name))
        os.rmdir(staged)
        with open(os.path.join(tmp, SOLUTION_FILE), "w") as f:
            json.dump(round_floats(record), f, indent=2, allow_nan=False)
            f.write("\n")
        for name, text in recipes.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, README_FILE), "w") as f:
            f.write(readme)
    return os.path.abspath(os.fspath(out_dir))


__all__ = ["PATH_RECIPE", "README_FILE", "SOLUTION_FILE", "UPPER_OUTPUT", "UPPER_RECIPE", "ExportError", "check_finite",
           "check_path", "export_path", "passthrough_recipe", "path_params", "upper_recipe"]
