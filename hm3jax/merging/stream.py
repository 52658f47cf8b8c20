"""Out-of-core merging from disk to disk: `merge_recipe` runs a mergekit recipe from safetensors
checkpoints into an HF model directory (sharded safetensors weights, config.json, mergekit_config.yml,
a model card, the tokenizer). The tensors are merged by pipeline.py's `run_plan`: tensor by tensor,
with reading, computing and writing overlapped, so peak memory is a small multiple of the largest
tensor; the dtypes and arguments of each tensor's merge come from job_args.py.

The output directory appears atomically (written under a temporary sibling, renamed on success). It
may not be, contain or lie inside an input (models, tokenizer source, the recipe file). Every input
tensor and every merged tensor is checked for NaN/Inf: an error names the model and tensor (with
`allow_nonfinite`, a warning), so a non-finite tensor is never written silently. When interrupted
(KeyboardInterrupt), the read-ahead threads and the writer thread are stopped and joined, every
dispatched computation is waited for, and only then does the exception propagate and the temporary
directory go.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable

import yaml

from hm3jax.io import interrupt, paths
from hm3jax.io.atomic import OutputExistsError, atomic_output_dir, check_output_path
from hm3jax.io.paths import model_file
from hm3jax.io.safetensors_io import CheckpointReader, parse_size
from hm3jax.merging.card import recipe_card, transformers_version, write_model_card
from hm3jax.merging.chat_template import resolve_chat_template, save_with_template
from hm3jax.merging.finite import NonFiniteError, NonFiniteWarning, count_nonfinite
from hm3jax.merging.job_args import COMPUTE_DTYPES
from hm3jax.merging.pipeline import PREFETCH_BYTES, TensorTiming, run_plan
from hm3jax.merging.plan import build_plan, open_readers
from hm3jax.merging.recipe import Recipe, input_paths, load_recipe

__all__ = [
    "NonFiniteError",
    "NonFiniteWarning",
    "RandomMasksNotice",
    "TensorTiming",
    "count_nonfinite",
    "merge_recipe",
    "parse_shard_size",
]

# Copied from the tokenizer's model beside the merged weights (as mergekit does).
TOKENIZER_FILES = (*paths.TOKENIZER_FILES, paths.GENERATION_CONFIG_FILE)


class RandomMasksNotice(UserWarning):
    """The recipe uses a random method: its masks come from hm3jax's stream, not mergekit's torch one."""


def parse_shard_size(size: int | str) -> int:
    """Bytes from an int, mergekit's "5B" / "500M" / "100k" (10^9 / 10^6 / 10^3), or "5GB", "500MiB"."""
    s = str(size).strip()
    if s[:-1].isdigit() and s[-1:].lower() in ("k", "m", "b"):
        return int(s[:-1]) * {"k": 10**3, "m": 10**6, "b": 10**9}[s[-1].lower()]
    return parse_size(size)


def merge_recipe(recipe: str | os.PathLike | dict | Recipe, out_dir: str | os.PathLike, *,
                 overwrite: bool = False, max_shard_size: int | str = "5B", seed: int = 0,
                 copy_tokenizer: bool = True, prefetch: int = 2, prefetch_bytes: int | str = PREFETCH_BYTES,
                 progress: bool = True, allow_nonfinite: bool = False, strict: bool = False,
                 compute_dtype: str = "mergekit", write_card: bool = True,
                 on_tensor: Callable[[TensorTiming], None] | None = None) -> str:
    """Run a mergekit-style recipe from checkpoints on disk into `out_dir` (an HF model directory).

    Args:
      recipe: YAML path, dict, or parsed Recipe.
      out_dir: output directory; must not exist unless `overwrite`, and may never be, contain or lie
        inside an input (a model, the tokenizer source, the recipe file).
      max_shard_size: bytes per output shard (see parse_shard_size).
      seed: PRNG seed of random methods (each tensor draws from fold_in(seed, crc32(name))).
      copy_tokenizer: copy the tokenizer files of the base model (else the first model) into the
        output, when the recipe sets no tokenizer; with `tokenizer_source` / `tokenizer` the output
        tokenizer (merging/vocab.py) is always saved, as mergekit does. With `chat_template` the
        tokenizer is loaded and re-saved with that template instead of copied (chat_template.py).
      prefetch: how many upcoming tensors to load while the current one is merged (0 = none).
      prefetch_bytes: cap on the input bytes of those upcoming tensors (int or "512MiB", "1GB"; see
        parse_size); the next tensor is always loaded ahead when prefetch >= 1, whatever its size.
      progress: show a tqdm progress bar (bytes written) on stderr.
      allow_nonfinite: NaN/Inf in an input or merged tensor is a NonFiniteWarning instead of a
        NonFiniteError.
      strict: recipe keys mergekit ignores (undeclared parameters, unknown keys; see
        hm3jax.merging.recipe) raise RecipeError instead of an IgnoredKeyWarning each.
      compute_dtype: "mergekit" (default): each method's arithmetic in the dtype mergekit 0.1.5 runs
        it in, so float16/bfloat16 recipes give mergekit's tensors: the task-arithmetic family (ties,
        dare_*, task_arithmetic, breadcrumbs*, della*), model_stock, nuslerp, sce and karcher in the recipe's
        `dtype` (else the inputs'), the other methods in float32. "float32": all arithmetic in float32, rounded once to the
        output dtype (more accurate for 16-bit recipes; differs from mergekit's tensors).
      write_card: write a model card, README.md with Hugging Face front matter (merging/card.py), as
        mergekit's --write-model-card (its default) does.
      on_tensor: called with each output tensor's TensorTiming once it is written (from the writer
        thread); each merge is then waited for before the next is dispatched, so the times are exact.
    A recipe using a random method (dare_*, della*) gives one RandomMasksNotice: its masks come from
    hm3jax's keyed hash, so the output equals mergekit's in distribution, not tensor for tensor.
    The output's config.json carries the installed transformers' `transformers_version`.
    Returns the absolute output path. Raises RecipeError / PlanError / OutputExistsError /
    UnsafeOutputError / CheckpointError / NonFiniteError with messages naming the key, tensor or file
    at fault; on any error (and on KeyboardInterrupt) nothing is left at `out_dir`, an old `out_dir`
    is unchanged and the temporary directory is removed.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise OutputExistsError(out_dir)  # before reading anything
    try:
        ahead_bytes = parse_size(prefetch_bytes)
    except ValueError:
        raise ValueError(f"prefetch_bytes {prefetch_bytes!r}: expected a positive number of bytes, "
                         "an int or a string like '512MiB', '1GB'") from None
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: supported: {', '.join(COMPUTE_DTYPES)}")
    recipe_file = None if isinstance(recipe, (dict, Recipe)) else os.fspath(recipe)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, strict=strict)
    inputs = [recipe_file, *input_paths(recipe)]
    check_output_path(out_dir, inputs)
    if recipe.method.random:
        warnings.warn(f"merge method {recipe.method.name!r} draws random masks; hm3jax's masks (seed {seed}) are "
                      "not mergekit's, so the tensors agree with mergekit's in distribution, not value",
                      RandomMasksNotice, stacklevel=2)
    # Where hm3jax.io.interrupt handles signals (the CLI), they stop the run between tensors.
    with interrupt.deferred():
        readers = open_readers(recipe)
        try:
            _merge_into(recipe, readers, out_dir, overwrite=overwrite, max_shard_size=max_shard_size,
                        seed=seed, copy_tokenizer=copy_tokenizer, prefetch=prefetch,
                        prefetch_bytes=ahead_bytes, progress=progress, inputs=inputs,
                        allow_nonfinite=allow_nonfinite, compute_dtype=compute_dtype, write_card=write_card,
                        on_tensor=on_tensor)
        finally:
            for r in readers.values():
                r.close()
    return out_dir


def _merge_into(recipe: Recipe, readers: dict[str, CheckpointReader], out_dir: str, *, overwrite: bool,
                max_shard_size: int | str, seed: int, copy_tokenizer: bool, prefetch: int,
                prefetch_bytes: int, progress: bool, inputs: list, allow_nonfinite: bool,
                compute_dtype: str = "mergekit", write_card: bool = True,
                on_tensor: Callable[[TensorTiming], None] | None = None) -> None:
    plan = build_plan(recipe, readers)
    shard_bytes = parse_shard_size(max_shard_size)
    tokenizer_files = []
    if copy_tokenizer and plan.tokenizer_from:
        for name in TOKENIZER_FILES:
            src = os.path.join(plan.tokenizer_from, name)
            if os.path.isfile(src):  # a link out of the model directory is refused, not copied
                tokenizer_files.append((model_file(plan.tokenizer_from, name, plan.tokenizer_from), name))
    template = resolve_chat_template(recipe.chat_template, input_paths(recipe)) if recipe.chat_template else None
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        run_plan(plan, readers, tmp, max_shard_size=shard_bytes, seed=seed, prefetch=prefetch,
                 prefetch_bytes=prefetch_bytes, progress=progress, allow_nonfinite=allow_nonfinite,
                 compute_dtype=compute_dtype, on_tensor=on_tensor)
        config = dict(plan.config)
        config["transformers_version"] = transformers_version() or config.get("transformers_version")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({k: v for k, v in config.items() if v is not None or k != "transformers_version"}, f,
                      indent=2)
            f.write("\n")
        text = recipe.text or yaml.safe_dump({"merge_method": recipe.method.name})
        with open(os.path.join(tmp, "mergekit_config.yml"), "w", encoding="utf-8") as f:
            f.write(text)
        if write_card:
            write_model_card(tmp, recipe_card(recipe, text, os.path.basename(out_dir)))
        for src, name in tokenizer_files if not recipe.chat_template else ():  # else re-saved, as mergekit
            shutil.copyfile(src, os.path.join(tmp, name))
        if plan.vocabulary is not None or (recipe.chat_template and copy_tokenizer and plan.tokenizer_from):
            save_with_template(plan.vocabulary.tokenizer if plan.vocabulary else plan.tokenizer_from, template, tmp)
