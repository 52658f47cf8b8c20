"""From a recipe and the input checkpoints' headers to a list of per-tensor jobs (no tensor data read).

Architecture-agnostic: the tensors to merge, their shapes and which of them form layer stacks come
from the safetensors headers and config.json (merging/layout.py), so any HF safetensors checkpoint
merges (Llama, Mistral, Qwen, Gemma, Granite, Phi, GPT-2, LLaVA's language and vision towers, ...).
Inputs must share the output's tensor names (a tied output head falls back to the input embedding,
as in mergekit) and `model_type`; in the `models` form every stack must have the same number of
layers in all models (use `slices` otherwise); `slices` need a single layer stack (mergekit's
`modules` syntax for several is not supported); weights must be float tensors; `linear` weights that
sum to 0 under `normalize` are refused (the division would make every tensor NaN/Inf).

Follows mergekit 0.1.5's planner: the `models` form becomes one output slice over all layers of each
stack (the base model is appended as an input when it is not listed); an output slice's layer i gets
t = i / (n − 1) (t = 1 for a one-layer slice) for gradients; tensors outside the stacks take the
first slice's inputs (embeddings) or the last slice's (final norms and heads), both at t = 0. Shared
parameters match filters against the output tensor name; per-model parameters against that model's
input tensor name. Precedence, highest first: the source's own `parameters`, the slice's, the
top-level ones. With `slices`, the output config.json's layer count (the stack's key, e.g.
`num_hidden_layers`, `n_layer`) is the number of layers written.
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
from hm3jax.merging.checks import check_model_count, check_values
from hm3jax.merging.layout import LAYER_KEYS, Layout, LayoutError, get_dotted, read_layout, set_dotted, tied_embedding
from hm3jax.merging.recipe import OutputSlice, Recipe, RecipeError, Source, resolve
from hm3jax.merging.vocab import VocabError, Vocabulary, build_vocabulary, is_vocab_tensor


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
    vocab: bool = False  # rows are tokens: each input is re-indexed to the output vocabulary first
    buffer: bool = False  # a non-float tensor (e.g. position ids) copied from the inputs, which agree


@dataclasses.dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    jobs: tuple[TensorJob, ...]
    config: dict  # config.json of the output
    donor: str  # model whose config (and by default tokenizer) the output takes
    tokenizer_from: str | None  # tokenizer files copied from there (None: see `vocabulary`)
    vocabulary: Vocabulary | None = None  # the output vocabulary, with tokenizer_source / tokenizer


def open_readers(recipe: Recipe) -> dict[str, CheckpointReader]:
    """A reader per referenced model path, each with a usable config.json; errors name the model."""
    paths = []
    if recipe.base_model:
        paths.append(recipe.base_model)
    for s in _slices(recipe):
        paths += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
    readers = {}
    for p in dict.fromkeys(paths):
        if not os.path.isdir(p):
            raise PlanError(f"{recipe.source}: model {p!r} is not a local directory (HF hub ids are not "
                            "downloaded; give a path to a directory with config.json and *.safetensors)")
        readers[p] = CheckpointReader(p)
        if readers[p].config is None:
            raise PlanError(f"model {p}: no config.json")
    types = {p: r.config.get("model_type") for p, r in readers.items()}
    kinds = {t for t in types.values() if t is not None}
    if len(kinds) > 1:
        detail = ", ".join(f"{p} is {t!r}" for p, t in types.items())
        raise PlanError(f"{recipe.source}: the models' config.json model_type differ ({detail}); models of "
                        "different architectures do not merge tensor by tensor")
    return readers


def layouts_of(readers: Mapping[str, CheckpointReader]) -> dict[str, Layout]:
    """Each model's layer stacks and loose tensors (merging/layout.py); LayoutError -> PlanError."""
    try:
        return {p: read_layout(r.names, r.config, p) for p, r in readers.items()}
    except LayoutError as e:
        raise PlanError(str(e)) from None


def _slices(recipe: Recipe) -> list[OutputSlice]:
    """The output slices; the `models` form is one slice over every model (and the base)."""
    if recipe.slices is not None:
        return list(recipe.slices)
    sources = list(recipe.models)
    if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
        sources.append(Source(model=recipe.base_model))
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
    try:
        check_model_count(method, len(models) - (pos is not None), where)
    except ValueError as e:
        raise PlanError(str(e)) from None
    return pos


def _input_name(reader: CheckpointReader, name: str) -> str | None:
    if name in reader:
        return name
    return tied_embedding(reader.names, name)  # a tied head is the embedding matrix (as mergekit)


def build_plan(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> MergePlan:
    """Every output tensor's inputs and parameters, with shapes checked. Reads headers only."""
    method = recipe.method
    slices = _slices(recipe)
    layouts = layouts_of(readers)
    donor = recipe.base_model or slices[0].sources[0].model
    lay = layouts[donor]
    jobs: list[TensorJob] = []
    vocabulary = _vocabulary(recipe, readers)

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
            inputs.append((src.model, real))
            shapes.append(reader.shape(real))
        codes = [readers[m].dtype(n) for m, n in inputs]
        buffer = all(c not in FLOAT_DTYPES for c in codes)  # e.g. int64 position ids: copied, not merged
        for (m, real), c in zip(inputs, codes):
            if (not buffer and c not in FLOAT_DTYPES) or (buffer and c != codes[0]):
                raise PlanError(f"{readers[m].shard_of(real)}: tensor {real}: dtype {dtype_code(c)}; expected a "
                                "float dtype (F16, BF16, F32, F64) for model weights, or the same non-float dtype "
                                "in every input for a buffer")
        vocab = vocabulary is not None and is_vocab_tensor(name)
        if vocab:  # the rows are rebuilt for the output vocabulary; the rest must agree
            shapes = [(vocabulary.size, *sh[1:]) for sh in shapes]
        if len(set(map(tuple, shapes))) > 1:
            detail = ", ".join(f"{m} {list(sh)}" for (m, _), sh in zip(inputs, shapes))
            raise PlanError(f"tensor {name}: input shapes differ: {detail}")
        if buffer:  # the inputs must agree on its values (checked when read), as mergekit requires
            jobs.append(TensorJob(name=name, inputs=tuple(inputs), base=None, shared={}, per_model=(),
                                  shape=tuple(shapes[0]), in_dtype=np.dtype(codes[0]), buffer=True))
            return
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
            check_values({**shared, **p}, f"{recipe.source}: tensor {name}", error=PlanError)
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
                              per_model=tuple(per_model), shape=tuple(shapes[0]), in_dtype=in_dtype,
                              vocab=vocab))

    first, last = slices[0], slices[-1]
    for name in _loose(lay.pre, first, layouts, readers, "pre"):
        add(name, first, [name] * len(first.sources), 0.0, "embeddings")
    config = dict(readers[donor].config)
    if recipe.slices is None:
        for st in lay.stacks:
            counts = {}
            for src in first.sources:
                other = layouts[src.model].stack(st.prefix)
                if other is None:
                    raise PlanError(f"model {src.model} has no layer stack {st.prefix} (tensors {st.prefix}.N.*), "
                                    f"which {donor} has")
                counts[src.model] = other.n
            if len(set(counts.values())) > 1:
                detail = ", ".join(f"{m} has {n}" for m, n in counts.items())
                raise PlanError(f"{recipe.source}: models: the models have different numbers of layers in "
                                f"{st.prefix} ({detail}); the `models` form merges layer i with layer i and "
                                "would drop layers. Use `slices` with a layer_range per model to say which "
                                "layers to merge")
            for idx in range(st.n):
                t = idx / (st.n - 1) if st.n > 1 else 1.0
                for suf in st.layers[idx]:
                    name = st.name(idx, suf)
                    add(name, first, [name] * len(first.sources), t, f"{st.prefix} layer {idx}")
    else:
        st = _single_stack(lay, donor, recipe.source)
        for i, s in enumerate(slices):
            for src in s.sources:
                other = layouts[src.model].stack(st.prefix)
                if other is None:
                    raise PlanError(f"{recipe.source}: slices[{i}]: model {src.model} has no layer stack "
                                    f"{st.prefix} (tensors {st.prefix}.N.*), which {donor} has")
                if src.layer_range[1] > other.n:
                    raise PlanError(f"{recipe.source}: slices[{i}]: layer_range {list(src.layer_range)} of "
                                    f"{src.model} exceeds its {other.n} layers")
        out_layer, origins = 0, []
        for i, s in enumerate(slices):
            lo, hi = s.sources[0].layer_range
            ref = layouts[s.sources[0].model].stack(st.prefix)
            n = hi - lo
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                for suf in ref.layers[lo + idx]:
                    in_names = [st.name(src.layer_range[0] + idx, suf) for src in s.sources]
                    add(st.name(out_layer, suf), s, in_names, t, f"slices[{i}] layer {idx}")
                origins.append((s.sources[0].model, lo + idx))
                out_layer += 1
        if st.config_key is None:
            raise PlanError(f"{os.path.join(donor, 'config.json')}: no layer count for {st.prefix} (looked for "
                            f"{', '.join(LAYER_KEYS)}), so the output's config.json cannot give its "
                            f"{out_layer} layers")
        config = _per_layer_config(set_dotted(config, st.config_key, out_layer), st, origins, readers, layouts)
    for name in _loose(lay.post, last, layouts, readers, "post"):
        add(name, last, [name] * len(last.sources), 0.0, "final norm and head")

    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    if vocabulary is not None:  # mergekit's output config counts the output tokenizer's tokens
        nested = "vocab_size" not in config and get_dotted(config, "text_config.vocab_size") is not None
        config = set_dotted(config, "text_config.vocab_size" if nested else "vocab_size", vocabulary.size)
    return MergePlan(recipe=recipe, method=method, jobs=tuple(jobs), config=config, donor=donor,
                     tokenizer_from=None if vocabulary is not None else donor, vocabulary=vocabulary)


def _vocabulary(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> Vocabulary | None:
    """The output vocabulary when the recipe sets a tokenizer (merging/vocab.py); else None."""
    src = recipe.tokenizer_source
    if src is None:
        return None
    if src == "base" and not recipe.base_model:
        raise RecipeError(f"{recipe.source}: tokenizer_source 'base' needs a base_model")
    if src not in ("base", "union") and not os.path.isdir(src):
        raise RecipeError(f"{recipe.source}: tokenizer_source {src!r} is not 'base', 'union' or a local model "
                          "directory")
    try:
        return build_vocabulary(src, recipe.tokens, recipe.base_model, list(readers),
                                {m: r.config for m, r in readers.items()}, recipe.pad_to_multiple_of)
    except VocabError as e:
        raise PlanError(f"{recipe.source}: {e}") from None


def _single_stack(lay: Layout, donor: str, where: str):
    if len(lay.stacks) == 1:
        return lay.stacks[0]
    if not lay.stacks:
        raise PlanError(f"{where}: slices: model {donor} has no layer-indexed tensors (names like "
                        "model.layers.N.*), so there are no layers to slice")
    raise PlanError(f"{where}: slices: model {donor} has {len(lay.stacks)} layer stacks "
                    f"({', '.join(s.prefix for s in lay.stacks)}); `slices` take one (mergekit's `modules` "
                    "syntax for several is not supported); use the `models` form")


def _loose(names: tuple[str, ...], s: OutputSlice, layouts: Mapping[str, Layout],
           readers: Mapping[str, CheckpointReader], part: str) -> list[str]:
    """The tensors outside the stacks, taken from slice `s`: the donor's, and an output head (lm_head)
    when any of the slice's models has one (it is skipped when none has; a model without one gives its
    tied embedding), as mergekit treats the optional head."""
    out = list(names)
    for src in s.sources:
        out += [n for n in getattr(layouts[src.model], part) if n not in out and n.endswith("lm_head.weight")]
    return [n for n in out if not n.endswith("lm_head.weight") or any(n in readers[src.model] for src in s.sources)]


def _per_layer_config(config: dict, st, origins: list[tuple[str, int]], readers: Mapping[str, CheckpointReader],
                      layouts: Mapping[str, Layout]) -> dict:
    """Per-layer lists next to the layer count (`layer_types`, ...: a list with one entry per layer)
    re-indexed for the output's layers, each entry from the model and layer it was taken from, so the
    output config stays loadable (transformers checks len(layer_types) == num_hidden_layers)."""
    sub = st.config_key.rpartition(".")[0]
    where = get_dotted(config, sub) if sub else config
    for key, value in list(where.items()):
        if key == "architectures" or not isinstance(value, list) or len(value) != st.n:
            continue
        path = f"{sub}.{key}" if sub else key
        new = []
        for model, j in origins:
            theirs = get_dotted(readers[model].config, path)
            n = layouts[model].stack(st.prefix).n
            if not isinstance(theirs, list) or len(theirs) != n:
                raise PlanError(f"{os.path.join(model, 'config.json')}: {path} is not a list of {n} per-layer "
                                f"entries as in the other models; cannot write the output's {path}")
            new.append(theirs[j])
        config = set_dotted(config, path, new)
    return config
