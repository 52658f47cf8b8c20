"""mergekit YAML recipes: parse and validate them, and evaluate parameter settings per tensor.

Accepted top-level keys: merge_method, base_model, models (each `model` + optional `parameters`),
slices (each `sources` of `model` + `layer_range` [+ `parameters`], optional `base_model` and
`parameters`), parameters, dtype, out_dtype, tokenizer_source (`base`, `union` or a model path),
tokenizer (`source`, `tokens`, `pad_to_multiple_of`; see merging/vocab.py), chat_template (see
merging/chat_template.py). Exactly one of `models` / `slices`. An unknown merge method is an error.

Keys mergekit accepts and then ignores are ignored here too, each with a one-line IgnoredKeyWarning
naming the key (and the merge method, for a parameter): parameters the method does not declare (e.g.
`weight` on slerp), any unknown key of the recipe, a model entry, a slice, a source, a tokenizer or a
`{filter, value}` entry (mergekit's pydantic models drop unknown fields), and a slice's
`residual_weight` (declared by mergekit, never used). With `strict=True` each of those is a
RecipeError instead. Keys mergekit acts on but hm3jax cannot (`modules`, a
model's `lora` / `override_architecture`) are errors
that say so.

A parameter setting is a scalar, a gradient (list of scalars: interpolated over layer depth), or a
list of `{filter, value}` entries (first entry whose `filter` is a substring of the tensor name wins;
no filter, or "*", matches every tensor). See `evaluate`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import yaml

from hm3jax.io.paths import NotRegularFileError, open_regular
from hm3jax.merging.base import REQUIRED, MergeMethod
from hm3jax.merging.chat_template import ChatTemplateError, check_chat_template
from hm3jax.merging.methods import get_method
from hm3jax.merging.vocab import VocabError, parse_tokenizer

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template")
UNSUPPORTED_KEYS = {
    "modules": "per-module recipes (multimodal models) are not supported",
}
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
UNSUPPORTED_MODEL_REF_KEYS = {
    "lora": "LoRA adapters are not supported",
    "override_architecture": "the architecture comes from the model's config.json",
}
IGNORED_SLICE_KEYS = {"residual_weight": "mergekit declares it but never uses it"}
DTYPES = ("float32", "float16", "bfloat16")  # float64 would need jax_enable_x64
# tokenizer.pad_to_multiple_of above this would pad the vocabulary by up to that many rows of every
# embedding (1e11 asks for terabytes); recipes use 8 to 256.
PAD_LIMIT = 2**16


class RecipeError(ValueError):
    """A merge recipe that cannot be used; the message names the file and key at fault."""


class IgnoredKeyWarning(UserWarning):
    """A recipe key that mergekit accepts and ignores, so hm3jax ignores it too (`strict`: an error)."""


_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("hm3jax_recipe_strict", default=False)


def _ignored(warning: str, error: str) -> None:
    """A key mergekit ignores: IgnoredKeyWarning(warning), or RecipeError(error) while parsing strictly."""
    if _STRICT.get():
        raise RecipeError(error)
    warnings.warn(warning, IgnoredKeyWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class Conditional:
    """One `{filter, value}` entry of a parameter setting (filter None matches every tensor)."""

    value: Any
    filter: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """An input model of an output slice; `layer_range` None = all its layers (the `models` form)."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    sources: tuple[Source, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe. Settings are kept unevaluated (see `evaluate`)."""

    method: MergeMethod
    base_model: str | None
    models: tuple[Source, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    source: str  # where the recipe came from, for messages
    text: str = ""  # the YAML as written (copied next to the merged model)
    tokens: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # token -> vocab.TokenSpec
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # as written: a named template, "auto" or Jinja (chat_template.py)


# ------------------------------------------------------------------------------------------ parsing
def load_recipe(src: str | os.PathLike | Mapping[str, Any], strict: bool = False) -> Recipe:
    """Parse a recipe from a YAML file path or an already-loaded dict. Raises RecipeError.

    Keys mergekit ignores (module docstring) are dropped with an IgnoredKeyWarning each, or with
    `strict` raise RecipeError.
    """
    token = _STRICT.set(bool(strict))
    try:
        return _load_recipe(src)
    finally:
        _STRICT.reset(token)


def _load_recipe(src: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    text = ""
    if isinstance(src, Mapping):
        raw, where = dict(src), "recipe"
        text = yaml.safe_dump(raw, sort_keys=False)
    else:
        where = os.fspath(src)
        try:
            with open_regular(where, "r", what="recipe file", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise RecipeError(f"{where}: no such recipe file") from None
        except NotRegularFileError as e:
            raise RecipeError(str(e)) from None
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: not UTF-8 text (at byte {e.start})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML ({e})") from None
        except RecursionError:
            raise RecipeError(f"{where}: nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping (merge_method, models, ...)")
    _check_keys(raw, TOP_KEYS, where, extra=UNSUPPORTED_KEYS)
    if "merge_method" not in raw:
        raise RecipeError(f"{where}: missing merge_method")
    try:
        method = get_method(raw["merge_method"])
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None
    if ("models" in raw) == ("slices" in raw) or not (raw.get("models") or raw.get("slices")):
        raise RecipeError(f"{where}: give exactly one of 'models' or 'slices'")
    for key in ("models", "slices"):
        if raw.get(key) is not None and not isinstance(raw[key], list):
            raise RecipeError(f"{where}: {key} must be a list of "
                              f"{'models' if key == 'models' else 'slices'}, got {type(raw[key]).__name__} "
                              f"{raw[key]!r:.60}")
    models = slices = None
    if raw.get("models") is not None:
        models = tuple(_parse_model(m, method, f"{where}: models[{i}]") for i, m in enumerate(raw["models"]))
    else:
        slices = tuple(_parse_slice(s, method, f"{where}: slices[{i}]") for i, s in enumerate(raw["slices"]))
    tok = raw.get("tokenizer_source")
    tokens, pad = {}, None
    if raw.get("tokenizer") is not None:
        if tok is not None:
            raise RecipeError(f"{where}: give tokenizer_source or tokenizer, not both")
        if not isinstance(raw["tokenizer"], dict):
            raise RecipeError(f"{where}: tokenizer must be a mapping (source, tokens, pad_to_multiple_of)")
        _check_keys(raw["tokenizer"], TOKENIZER_KEYS, f"{where}: tokenizer")
        try:  # source defaults to mergekit's `union`
            tok, tokens, pad = parse_tokenizer({k: v for k, v in raw["tokenizer"].items() if k in TOKENIZER_KEYS},
                                               f"{where}: tokenizer")
        except VocabError as e:
            raise RecipeError(str(e)) from None
        if pad is not None and pad > PAD_LIMIT:
            raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of {pad} is too large (at most {PAD_LIMIT}; "
                              "it pads every embedding by up to that many rows)")
    if tok is not None and (not isinstance(tok, str) or not tok):
        raise RecipeError(f"{where}: tokenizer_source must be 'base', 'union' or a model path, got {tok!r}")
    template = raw.get("chat_template") or None  # mergekit: empty or null sets none
    if template is not None:
        try:
            template = check_chat_template(template)
        except ChatTemplateError as e:
            raise RecipeError(str(e).replace("recipe:", f"{where}:", 1)) from None
    return Recipe(
        method=method,
        base_model=_model_ref(raw.get("base_model"), f"{where}: base_model", optional=True),
        models=models, slices=slices,
        parameters=_parse_params(raw.get("parameters"), method, f"{where}: parameters"),
        dtype=_dtype(raw.get("dtype"), f"{where}: dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=tok, source=where, text=text, tokens=tokens, pad_to_multiple_of=pad,
        chat_template=template)


def input_paths(recipe: Recipe) -> list[str]:
    """Every local path a recipe reads: models, base models, a tokenizer source given as a path and the
    models named by `tokenizer.tokens`."""
    paths = [recipe.base_model] if recipe.base_model else []
    for src in recipe.models or ():
        paths.append(src.model)
    for s in recipe.slices or ():
        paths += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        paths.append(recipe.tokenizer_source)
    paths += [spec.model for spec in recipe.tokens.values() if spec.model]
    return list(dict.fromkeys(paths))


def _check_keys(d: Mapping, allowed: tuple, where: str, extra: Mapping[str, str] | None = None,
                ignored: Mapping[str, str] | None = None) -> None:
    """Refuse the `extra` keys (mergekit uses them, hm3jax cannot); warn about (strict: refuse) keys
    outside `allowed`, which mergekit ignores (`ignored`: known ones, with the reason)."""
    for k in d:
        if extra and k in extra:
            raise RecipeError(f"{where}: key {k!r} is not supported ({extra[k]}); supported keys: "
                              f"{', '.join(allowed)}")
        if k not in allowed:
            why = ignored[k] if ignored and k in ignored else "mergekit ignores unknown keys"
            _ignored(f"{where}: ignoring key {k!r} ({why}); supported keys: {', '.join(allowed)}",
                     f"{where}: unknown key {k!r}; supported keys: {', '.join(allowed)} (strict: {why})")


def _model_ref(v: Any, where: str, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if isinstance(v, dict) and isinstance(v.get("model"), str):
        _check_keys(v, ("model",), where, extra=UNSUPPORTED_MODEL_REF_KEYS)
        v = v["model"]  # mergekit's long form {model: path}
    if not isinstance(v, str) or not v:
        raise RecipeError(f"{where}: expected a model path (a local HF directory), got {v!r}")
    if "+" in v:
        raise RecipeError(f"{where}: {v!r}: LoRA references (model+lora) are not supported")
    return v


def _dtype(v: Any, where: str) -> str | None:
    if v is None:
        return None
    name = str(v).removeprefix("torch.")
    if name not in DTYPES:
        raise RecipeError(f"{where}: {v!r} is not supported; supported: {', '.join(DTYPES)}")
    return name


def _parse_model(m: Any, method: MergeMethod, where: str) -> Source:
    if isinstance(m, str):
        m = {"model": m}
    if not isinstance(m, dict):
        raise RecipeError(f"{where}: expected a mapping with 'model' (and optional 'parameters')")
    _check_keys(m, MODEL_KEYS, where)
    return Source(model=_model_ref(m.get("model"), f"{where}.model"),
                  parameters=_parse_params(m.get("parameters"), method, f"{where}.parameters"))


def _parse_slice(s: Any, method: MergeMethod, where: str) -> OutputSlice:
    if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
        raise RecipeError(f"{where}: expected a mapping with a non-empty 'sources' list")
    _check_keys(s, SLICE_KEYS, where, ignored=IGNORED_SLICE_KEYS)
    sources = []
    for i, src in enumerate(s["sources"]):
        w = f"{where}.sources[{i}]"
        if not isinstance(src, dict):
            raise RecipeError(f"{w}: expected a mapping with 'model' and 'layer_range'")
        _check_keys(src, SOURCE_KEYS, w)
        lr = src.get("layer_range")
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(x, int) for x in lr)
                or not 0 <= lr[0] < lr[1]):
            raise RecipeError(f"{w}.layer_range: expected [start, end] with 0 <= start < end, got {lr!r}")
        sources.append(Source(model=_model_ref(src.get("model"), f"{w}.model"), layer_range=tuple(lr),
                              parameters=_parse_params(src.get("parameters"), method, f"{w}.parameters")))
    lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
    if len(lengths) > 1:
        raise RecipeError(f"{where}: all sources of a slice must have the same number of layers, got "
                          f"{[list(src.layer_range) for src in sources]}")
    return OutputSlice(sources=tuple(sources),
                       base_model=_model_ref(s.get("base_model"), f"{where}.base_model", optional=True),
                       parameters=_parse_params(s.get("parameters"), method, f"{where}.parameters"))


def _parse_params(p: Any, method: MergeMethod, where: str) -> Mapping[str, Any]:
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise RecipeError(f"{where}: expected a mapping of parameter name -> setting")
    out = {}
    for k, v in p.items():
        if k in method.params:
            out[k] = _parse_setting(v, f"{where}.{k}")
            continue
        if v != []:  # mergekit checks the form of every setting, an empty list included
            _parse_setting(v, f"{where}.{k}")
        known = ", ".join(method.params) or "none"
        _ignored(f"{where}: merge method {method.name!r} has no parameter {k!r}; ignoring it, as mergekit "
                 f"does (its parameters: {known})",
                 f"{where}: merge method {method.name!r} has no parameter {k!r}; its parameters: {known} "
                 "(strict: mergekit would ignore it)")
    return out


def _parse_setting(v: Any, where: str) -> Any:
    scalar = (bool, int, float, str)
    if isinstance(v, scalar):
        return v
    if isinstance(v, dict):
        return (_parse_conditional(v, where),)
    if isinstance(v, list) and v:
        if all(isinstance(e, scalar) for e in v):
            return list(v)  # a gradient
        if all(isinstance(e, dict) for e in v):
            return tuple(_parse_conditional(e, f"{where}[{i}]") for i, e in enumerate(v))
    raise RecipeError(f"{where}: expected a value, a list of values (gradient) or a list of "
                      f"{{filter, value}} entries, got {v!r}")


def _parse_conditional(d: dict, where: str) -> Conditional:
    why = "mergekit ignores unknown keys" + ("" if "filter" in d else "; with no 'filter' the entry matches every tensor")
    _check_keys(d, ("value", "filter"), where, ignored={k: why for k in d})
    if "value" not in d:
        raise RecipeError(f"{where}: a filtered setting needs a 'value'")
    f = d.get("filter")
    if f is not None and not isinstance(f, str):
        raise RecipeError(f"{where}.filter: expected a string, got {f!r}")
    value = d["value"]
    if not (isinstance(value, (bool, int, float, str))
            or (isinstance(value, list) and value and all(isinstance(e, (bool, int, float, str)) for e in value))):
        raise RecipeError(f"{where}.value: expected a value or a list of values, got {value!r}")
    return Conditional(value=value, filter=f)


# ------------------------------------------------------------------------------------------ evaluation
def value_type(method: MergeMethod, name: str) -> type:
    """The Python type a parameter's values are coerced to (from its declared default)."""
    d = method.params[name].default
    if isinstance(d, bool):
        return bool
    if isinstance(d, (int, float, str)):
        return type(d)
    return float  # required or None default: numeric (weight, t, scale)


def coerce(v: Any, typ: type, where: str) -> Any:
    """Coerce a YAML scalar to a parameter's type (YAML may give 1 for 1.0, or '1e-3' as a string)."""
    try:
        if typ is bool:
            if isinstance(v, str) and v.lower() in ("true", "false"):
                return v.lower() == "true"
            if isinstance(v, (bool, int)) and v in (0, 1):
                return bool(v)
            raise ValueError
        if typ in (int, float) and isinstance(v, bool):
            raise ValueError
        if typ is int:
            f = float(v)
            if not math.isfinite(f) or f != int(f) or not -2**31 <= int(f) < 2**31:  # counts, not 2**70
                raise ValueError
            return int(f)
        out = typ(v)
        if typ is float and not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        raise RecipeError(f"{where}: {v!r:.60} is not a valid {'finite ' if typ in (int, float) else ''}"
                          f"{typ.__name__}") from None


def evaluate(setting: Any, tensor_name: str, t: float, typ: type, where: str = "") -> Any:
    """The value of a setting for one tensor at relative layer depth t in [0, 1]; None if no filter matches.

    Gradients of numbers interpolate linearly between neighbouring entries (position t·(n − 1));
    gradients of booleans/strings take entry int(t·(n − 1)). Tensors outside the layer stack are
    evaluated at t = 0 (the first value), as mergekit does.
    """
    if isinstance(setting, tuple):  # filtered entries
        for c in setting:
            if c.filter is None or c.filter == "*" or (tensor_name and c.filter in tensor_name):
                return evaluate(c.value, tensor_name, t, typ, where)
        return None
    if isinstance(setting, list):
        values = [coerce(v, typ, where) for v in setting]
        pos = t * (len(values) - 1)
        if typ not in (int, float):
            return values[int(pos)]
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], typ, where)
    return coerce(setting, typ, where)


def resolve(method: MergeMethod, name: str, scopes: list[Mapping[str, Any]], tensor_name: str, t: float,
            where: str) -> Any:
    """A parameter's value for one tensor: the first scope (highest precedence first) whose setting
    matches, else the declared default; a required parameter with no value raises RecipeError."""
    typ = value_type(method, name)
    for scope in scopes:
        if name in scope:
            v = evaluate(scope[name], tensor_name, t, typ, f"{where}: parameter {name}")
            if v is not None:
                return v
    default = method.params[name].default
    if default is REQUIRED:
        raise RecipeError(f"{where}: merge method {method.name!r} needs parameter {name!r} for tensor "
                          f"{tensor_name} and no setting gives it")
    return default
