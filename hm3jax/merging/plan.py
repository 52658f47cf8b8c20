"""From a recipe and the input checkpoints' headers to a list of per-tensor jobs (no tensor data read).

Every input's config.json must be a supported model; in the `models` form all models must have the
same number of layers (use `slices` otherwise); weights must be float tensors; `linear` weights that
sum to 0 under `normalize` are refused (the division would make every tensor NaN/Inf).

Follows mergekit 0.1.5's planner: the `models` form becomes one output slice over all layers (the base
model is appended as an input when it is not listed); each output slice's layer i gets
t = i / (n − 1) (t = 1 for a one-layer slice) for gradients; embeddings take the first slice's
inputs, the final norm and head the last slice's, both at t = 0. Shared parameters match filters
against the output tensor name; per-model parameters against that model's input tensor name.
Precedence, highest first: the source's own `parameters`, the slice's, the top-level ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from hm3jax.io.assemble import FLOAT_DTYPES
from hm3jax.io.safetensors_io import CheckpointReader, dtype_code
from hm3jax.merging.base import MergeMethod
from hm3jax.merging.recipe import OutputSlice, Recipe, RecipeError, Source, resolve
from hm3jax.models.config import ConfigError, ModelConfig
from hm3jax.models.params import layer_shapes

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class PlanError(ValueError):
    """A recipe that does not fit its input checkpoints (shapes, layer counts, missing tensors)."""


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One output tensor.

    inputs: (model path, input tensor name) per input, in mergekit's input order.
    base: position in `inputs` of the base model's tensor, or None (base-less methods: every input is
      a model). models = the other inputs, in order.
    shared: the method's shared parameter values; per_model: one dict per model (non-base input).
    """

    name: str
    inputs: tuple[tuple[str, str], ...]
    base: int | None
    shared: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    shape: tuple[int, ...]
    in_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    jobs: tuple[TensorJob, ...]
    config: dict  # config.json of the output
    donor: str  # model whose config (and by default tokenizer) the output takes
    tokenizer_from: str | None


def open_readers(recipe: Recipe) -> dict[str, CheckpointReader]:
    """A reader per referenced model path, each with a usable config.json; errors name the model."""
    paths = []
    if recipe.base_model:
        paths.append(recipe.base_model)
    for s in _slices(recipe, None):
        paths += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
    readers = {}
    for p in dict.fromkeys(paths):
        if not os.path.isdir(p):
            raise PlanError(f"{recipe.source}: model {p!r} is not a local directory (HF hub ids are not "
                            "downloaded; give a path to a directory with config.json and *.safetensors)")
        readers[p] = CheckpointReader(p)
        if readers[p].config is None:
            raise PlanError(f"model {p}: no config.json")
        cfg_path = os.path.join(p, "config.json")
        try:  # every input, not only the one whose config the output takes, must be a supported model
            ModelConfig.from_hf_dict(readers[p].config, source=cfg_path)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise PlanError(f"{cfg_path}: a field has a value of the wrong type ({e}); expected an HF "
                            "config.json of a supported model") from None
    return readers


def _num_layers(readers, model: str) -> int:
    n = readers[model].config.get("num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"{os.path.join(model, 'config.json')}: num_hidden_layers is {n!r}; expected a "
                        "positive integer (the number of transformer layers)")
    return n


def _slices(recipe: Recipe, readers) -> list[OutputSlice]:
    if recipe.slices is not None:
        return list(recipe.slices)
    sources = list(recipe.models)
    if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
        sources.append(Source(model=recipe.base_model))
    if readers is not None:
        counts = {s.model: _num_layers(readers, s.model) for s in sources}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{m} has {n}" for m, n in counts.items())
            raise PlanError(f"{recipe.source}: models: the models have different numbers of layers ({detail}); "
                            "the `models` form merges layer i with layer i and would drop layers. Use "
                            "`slices` with a layer_range per model to say which layers to merge")
        sources = [dataclasses.replace(s, layer_range=(0, counts[s.model])) for s in sources]
    return [OutputSlice(sources=tuple(sources))]


def _check_inputs(method: MergeMethod, models: list[str], base: str | None, where: str) -> int | None:
    """Position of the base among the inputs (None for base-less methods); errors on bad counts."""
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise PlanError(f"{where}: model(s) listed more than once as inputs: {', '.join(dup)}")
    pos = None
    if method.base != "ignored" and base is not None:
        if base not in models:
            raise PlanError(f"{where}: base model {base} is not among the slice's sources")
        pos = models.index(base)
    if method.base == "required" and pos is None:
        raise PlanError(f"{where}: merge method {method.name!r} needs a base model; set base_model")
    n = len(models) - (pos is not None)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
        raise PlanError(f"{where}: merge method {method.name!r} takes {want} non-base model(s), got {n}")
    return pos


def _check_values(method: MergeMethod, p: Mapping[str, Any], where: str) -> None:
    d = p.get("density")
    if d is not None and not 0 < d <= 1:
        raise PlanError(f"{where}: density {d} is outside (0, 1]")
    g = p.get("gamma")
    if g is not None and not 0 <= g <= 1:
        raise PlanError(f"{where}: gamma {g} is outside [0, 1]")
    e = p.get("epsilon")
    if e is not None and d is not None and d < 1 and not (d - e > 0 and d + e < 1):
        raise PlanError(f"{where}: density ± epsilon ({d} ± {e}) must lie in (0, 1)")
    if p.get("trim") is not None and p["trim"] not in ("exact", "search", "sort"):
        raise PlanError(f"{where}: trim {p['trim']!r}; supported: exact, search, sort")


def _input_name(reader: CheckpointReader, name: str) -> str | None:
    if name in reader:
        return name
    if name == HEAD and EMBED in reader:
        return EMBED  # tied embeddings: the head is the embedding matrix
    return None


def build_plan(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> MergePlan:
    """Every output tensor's inputs and parameters, with shapes checked. Reads headers only."""
    method = recipe.method
    slices = _slices(recipe, readers)
    for i, s in enumerate(slices):
        for src in s.sources:
            n = _num_layers(readers, src.model)
            if src.layer_range[1] > n:
                raise PlanError(f"{recipe.source}: slices[{i}]: layer_range {list(src.layer_range)} of "
                                f"{src.model} exceeds its {n} layers")
    donor = recipe.base_model or slices[0].sources[0].model
    cfg = ModelConfig.from_hf_dict(readers[donor].config, source=os.path.join(donor, "config.json"))
    suffixes = [".".join(p) for p in layer_shapes(cfg)]
    jobs: list[TensorJob] = []

    def add(name: str, s: OutputSlice, in_names: list[str], t: float, where: str):
        models = [src.model for src in s.sources]
        base = s.base_model or recipe.base_model
        base_pos = _check_inputs(method, models, base, where)
        inputs, shapes = [], []
        for src, nm in zip(s.sources, in_names):
            reader = readers[src.model]
            real = _input_name(reader, nm)
            if real is None:
                raise PlanError(f"tensor {nm} is missing from model {src.model}")
            if reader.dtype(real) not in FLOAT_DTYPES:
                raise PlanError(f"{reader.shard_of(real)}: tensor {real}: dtype {dtype_code(reader.dtype(real))}; "
                                "expected a float dtype (F16, BF16, F32, F64) for model weights")
            inputs.append((src.model, real))
            shapes.append(reader.shape(real))
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{m} {list(sh)}" for (m, _), sh in zip(inputs, shapes))
            raise PlanError(f"tensor {name}: input shapes differ: {detail}")
        shared_scopes = [s.parameters, recipe.parameters]
        shared, per_model = {}, []
        for k, prm in method.params.items():
            if not prm.per_model:
                shared[k] = resolve(method, k, shared_scopes, name, t, f"{recipe.source}: {where}")
        for j, (src, nm) in enumerate(zip(s.sources, in_names)):
            if j == base_pos:
                continue
            scopes = [x.parameters for x in s.sources if x.model == src.model] + shared_scopes
            per_model.append({k: resolve(method, k, scopes, nm, t, f"{recipe.source}: {where} ({src.model})")
                              for k, prm in method.params.items() if prm.per_model})
        for p in (shared, *per_model):
            _check_values(method, {**shared, **p}, f"{recipe.source}: tensor {name}")
        if method.name == "linear" and shared.get("normalize") and per_model:
            # linear divides by the sum of the weights unguarded (as mergekit): a zero sum is all NaN/Inf.
            w = np.asarray([pm["weight"] for pm in per_model], np.float32)
            if w.sum() == 0:
                given = ", ".join(f"{src.model}: {float(x):g}" for src, x in
                                  zip([x for j, x in enumerate(s.sources) if j != base_pos], w))
                raise PlanError(f"{recipe.source}: tensor {name}: the weights ({given}) sum to 0 and "
                                "normalize divides by their sum; give weights with a non-zero sum or set "
                                "normalize: false")
        in_dtype = np.result_type(*[readers[m].dtype(n) for m, n in inputs])
        jobs.append(TensorJob(name=name, inputs=tuple(inputs), base=base_pos, shared=shared,
                              per_model=tuple(per_model), shape=tuple(shapes[0]), in_dtype=in_dtype))

    first, last = slices[0], slices[-1]
    add(EMBED, first, [EMBED] * len(first.sources), 0.0, "embeddings")
    out_layer = 0
    for i, s in enumerate(slices):
        lo, hi = s.sources[0].layer_range
        n = hi - lo
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            for suf in suffixes:
                in_names = [f"model.layers.{src.layer_range[0] + idx}.{suf}" for src in s.sources]
                add(f"model.layers.{out_layer}.{suf}", s, in_names, t, f"slices[{i}] layer {idx}")
            out_layer += 1
    add(NORM, last, [NORM] * len(last.sources), 0.0, "final norm")
    if any(HEAD in readers[src.model] for src in last.sources):
        add(HEAD, last, [HEAD] * len(last.sources), 0.0, "head")

    config = dict(readers[donor].config)
    config["num_hidden_layers"] = out_layer
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    tok = recipe.tokenizer_source
    if tok == "base":
        if not recipe.base_model:
            raise RecipeError(f"{recipe.source}: tokenizer_source 'base' needs a base_model")
        tok = recipe.base_model
    elif tok is not None and not os.path.isdir(tok):
        raise RecipeError(f"{recipe.source}: tokenizer_source {tok!r} is not 'base' or a local model directory")
    return MergePlan(recipe=recipe, method=method, jobs=tuple(jobs), config=config, donor=donor,
                     tokenizer_from=tok or donor)
