"""The model card (README.md with Hugging Face front matter) and config fields of a merge output.

`model_card` builds the card from what any merge knows (method, base, inputs, recipe text), so other
writers of model directories (export code) can call it too; `write_model_card` writes it into a
directory. The front matter is what the Hub reads: `library_name: transformers`, `tags` (`merge`,
`mergekit-compatible`, ...) and `base_model` (the inputs that are Hub repositories: a Hub id, or a
local copy in the Hub cache, `.../models--org--name/snapshots/<rev>`). Local inputs are listed in
the body by path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import metadata

import yaml

from hm3jax.merging.recipe import Recipe

README_FILE = "README.md"
TAGS = ("merge", "mergekit-compatible")
_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str) -> str | None:
    """The Hugging Face Hub id an input refers to: `org/name` when it is one (and no such local
    directory exists) or when it is a snapshot in the Hub cache; None for other local paths."""
    m = _HUB_CACHE.search(str(model))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if _HUB_ID.match(str(model)) and not os.path.exists(model):
        return str(model)
    return None


def transformers_version() -> str | None:
    """The installed transformers' version (as `save_pretrained` writes it into config.json), without
    importing transformers; None when it is not installed."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def model_card(method: str, models: Sequence[str], *, base_model: str | None = None,
               recipe_yaml: str | None = None, name: str | None = None, method_doc: str = "",
               tags: Sequence[str] = (), tool: str = "hm3jax (`python -m hm3jax.merge`)") -> str:
    """A README.md model card for a merged model.

    Args:
      method: the merge method's name (e.g. "ties"), or a short description of the merge.
      models: the merged models (paths or Hub ids), without the base.
      base_model: the base model, when the method has one.
      recipe_yaml: the recipe's text, shown in a yaml block.
      name: the card's title (default: "Merged model").
      method_doc: one line on the method (its paper), shown after its name.
      tags: tags added after `merge`, `mergekit-compatible`.
      tool: what made the merge, for the card's first sentence.
    Returns the card's text: YAML front matter, then Markdown.
    """
    inputs = ([base_model] if base_model else []) + [m for m in models if m != base_model]
    hub = [h for h in dict.fromkeys(hub_id(m) for m in inputs) if h]
    meta: dict = {}
    if hub:
        meta["base_model"] = hub
    meta["library_name"] = "transformers"
    meta["tags"] = list(dict.fromkeys([*TAGS, *tags]))
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    about = f"{method} ({method_doc})" if method_doc else method
    using = f", with `{base_model}` as the base" if base_model else ""
    listed = "\n".join(f"* `{m}`" for m in models if m != base_model) or "* (none besides the base)"
    parts = [f"---\n{front}\n---", f"# {name or 'Merged model'}",
             f"This model is a merge of pre-trained language models made with {tool}, which runs "
             "mergekit YAML recipes with mergekit's tensor semantics.",
             "## Merge details", "### Merge method", f"Merged with the {about} merge method{using}.",
             "### Models merged", "The following models were included in the merge:", listed]
    if recipe_yaml:
        parts += ["### Configuration", "The following YAML configuration was used to produce this model:",
                  f"```yaml\n{recipe_yaml.rstrip()}\n```"]
    return "\n\n".join(parts) + "\n"


def write_model_card(out_dir: str | os.PathLike, card: str) -> str:
    """Write `card` as out_dir/README.md; returns the file's path."""
    path = os.path.join(os.fspath(out_dir), README_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


def recipe_card(recipe: Recipe, text: str, name: str) -> str:
    """The model card of a recipe's output: its method, base, inputs and text."""
    base = recipe.base_model if recipe.method.base != "ignored" else None
    sources = [src.model for src in recipe.models or ()]
    sources += [src.model for s in recipe.slices or () for src in s.sources]
    if recipe.base_model and base is None:
        sources.append(recipe.base_model)  # a base-less method merges the base as one more input
    models = [p for p in dict.fromkeys(sources) if p != base]
    return model_card(recipe.method.name, models, base_model=base, recipe_yaml=text, name=name,
                      method_doc=recipe.method.doc)
