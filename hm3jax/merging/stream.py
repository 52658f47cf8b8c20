"""Out-of-core execution of a merge plan: tensor by tensor from safetensors checkpoints to a sharded
safetensors output, with reading, computing and writing overlapped.

Pipeline: a small thread pool loads the next `prefetch` jobs' input tensors (at most `prefetch_bytes`
of them beyond the first), each copied from its shard with pread into a buffer of its own and put on
the device; the main thread dispatches the jitted per-tensor merge (one compilation per method
settings and tensor shape: parameter values are arguments, so gradients over layers do not
recompile); a writer thread waits for each result and writes it at its offset in the pre-laid-out
output shards. Inputs are not memory-mapped (mapped pages, once read, would count in the process's
resident memory until the end), so the input files stay in the page cache only. Peak resident memory
is about the inputs of the tensor being merged and of those loaded ahead, two or three outputs, and
the method's temporaries for one tensor (for the largest tensor these dominate).

The output directory appears atomically (written under a temporary sibling, renamed on success). It
may not be, contain or lie inside an input (models, tokenizer source, the recipe file). Every input
tensor and every merged tensor is checked for NaN/Inf: an error names the model and tensor (with
`allow_nonfinite`, a warning), so a non-finite tensor is never written silently. When interrupted
(KeyboardInterrupt), the read-ahead threads and the writer thread are stopped and joined, every
dispatched computation is waited for, and only then does the exception propagate and the temporary
directory go.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
import yaml

from hm3jax.io import interrupt, paths
from hm3jax.io.atomic import OutputExistsError, atomic_output_dir, check_output_path
from hm3jax.io.paths import model_file
from hm3jax.io.safetensors_io import CheckpointReader, parse_size
from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.merging.base import MergeMethod, merge_leaf, tensor_key
from hm3jax.merging.card import recipe_card, transformers_version, write_model_card
from hm3jax.merging.chat_template import resolve_chat_template, save_with_template
from hm3jax.merging.plan import MergePlan, TensorJob, build_plan, open_readers
from hm3jax.merging.recipe import Recipe, input_paths, load_recipe
from hm3jax.merging.task_arithmetic import LOW_PRECISION
from hm3jax.merging.task_arithmetic import METHODS as TA_METHODS
from hm3jax.merging.vocab import Vocabulary, rebuild_rows

# Copied from the tokenizer's model beside the merged weights (as mergekit does).
TOKENIZER_FILES = (*paths.TOKENIZER_FILES, paths.GENERATION_CONFIG_FILE)
PREFETCH_BYTES = 512 * 2**20  # default cap on the input bytes loaded ahead of the merge
_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
              "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_CHECK_CHUNK = 1 << 22  # elements per NaN/Inf check step (bounds the check's temporary memory)


class NonFiniteError(ValueError):
    """An input or merged tensor holds NaN or Inf (and allow_nonfinite was not given)."""


class NonFiniteWarning(UserWarning):
    """An input or merged tensor holds NaN or Inf and allow_nonfinite was given."""


class RandomMasksNotice(UserWarning):
    """The recipe uses a random method: its masks come from hm3jax's stream, not mergekit's torch one."""


class TensorTiming(NamedTuple):
    """Seconds spent on one output tensor (`on_tensor` of merge_recipe / run_plan)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load_s: float  # reading the inputs (a read-ahead thread)
    merge_s: float  # the jitted merge, dispatch to result (0 for a copied buffer)
    write_s: float  # the NaN/Inf check and the write into its shard


_EXPONENT_MASKS = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00}


def count_nonfinite(arr: np.ndarray) -> int:
    """How many entries of a float array are NaN or +-Inf (0 for non-float arrays), chunk by chunk.

    16-bit floats are checked on their bits (all exponent bits set), ~5x faster than np.isfinite
    on bfloat16.
    """
    mask = _EXPONENT_MASKS.get(arr.dtype)
    if mask is None and arr.dtype.kind != "f":
        return 0
    flat = arr.reshape(-1)
    if mask is not None:
        flat = flat.view(np.uint16)
    bad = 0
    for i in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[i:i + _CHECK_CHUNK]
        if mask is None:
            ok = np.isfinite(chunk)
            if not ok.all():
                bad += int(ok.size - np.count_nonzero(ok))
        else:
            bad += int(np.count_nonzero((chunk & mask) == mask))
    return bad


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


def _dtypes(plan: MergePlan, job: TensorJob) -> tuple[np.dtype | None, np.dtype]:
    """(dtype inputs are rounded to, as mergekit loads them; output dtype)."""
    r = plan.recipe
    if job.buffer:
        return None, np.dtype(job.in_dtype)
    load = _NP_DTYPES[r.dtype] if r.dtype else None
    out = _NP_DTYPES.get(r.out_dtype or r.dtype or "", job.in_dtype)
    return load, np.dtype(out)


COMPUTE_DTYPES = ("mergekit", "float32")
# Methods whose arithmetic mergekit runs in the loaded dtype (float16/bfloat16 included); it runs the
# others in float32 (linear, slerp, ...), or hm3jax does (see README, "dtype semantics").
NATIVE_DTYPE_METHODS = frozenset(m.name for m in TA_METHODS) | {"model_stock", "nuslerp", "sce", "karcher",
                                                                     "arcee_fusion", "nearswap", "ram",
                                                                     "ramplus_tl"}


def _compute_dtype(plan: MergePlan, job: TensorJob, load: np.dtype | None, how: str) -> np.dtype:
    """The dtype a job's arithmetic runs in under `compute_dtype=how` (see merge_recipe)."""
    if how not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {how!r}: supported: {', '.join(COMPUTE_DTYPES)}")
    native = np.dtype(load or job.in_dtype)
    if how == "mergekit" and plan.method.name in NATIVE_DTYPE_METHODS and native in LOW_PRECISION:
        return native
    return np.dtype(np.float32)


def _arguments(method: MergeMethod, job: TensorJob) -> tuple[tuple, dict, np.ndarray | None]:
    """(static params as (name, value) pairs, traced params as float32/int32 arrays, weights [M] or None) of one job."""
    params: dict[str, Any] = dict(job.shared)
    for k, p in method.params.items():
        if p.per_model and k != "weight":
            vals = [pm[k] for pm in job.per_model]
            params[k] = None if all(v is None for v in vals) else np.asarray(vals, np.float64)
    weights = None
    if method.uses_weights:
        weights = np.asarray([pm["weight"] for pm in job.per_model], np.float32)
        params["weight"] = np.asarray([pm["weight"] for pm in job.per_model], np.float64)  # for `prepare`
    prepared = method.prepare_params(params, job.shape)
    prepared.pop("weight", None)  # passed as `weights`
    static, rest = method.split_params(prepared)
    traced = {}
    for k, v in rest.items():
        if v is None:
            traced[k] = None
        else:
            a = np.asarray(v)
            traced[k] = a.astype(np.int32 if a.dtype.kind in "iu" else np.float32)
    return static, traced, weights


def _load(readers: dict[str, CheckpointReader], job: TensorJob, allow_nonfinite: bool = False,
          vocabulary: Vocabulary | None = None, load: np.dtype | None = None) -> list[jax.Array]:
    # `read` copies each input into a page-aligned buffer of its own (device_put aliases it on CPU)
    # rather than viewing the memory-mapped shard: mapped pages, once touched, stay in the process's
    # resident set until the map goes, so a whole merge would end up holding every input file.
    out = []
    for model, name in job.inputs:
        arr = readers[model].read(name)
        bad = count_nonfinite(arr)
        if bad:
            msg = (f"model {model}: tensor {name} ({os.path.basename(readers[model].shard_of(name))}) holds "
                   f"{bad} NaN/Inf value(s) of {arr.size}")
            if not allow_nonfinite:
                raise NonFiniteError(f"{msg}; a merge would spread them; pass --allow-nonfinite "
                                     "(allow_nonfinite=True) to merge it anyway")
            warnings.warn(msg, NonFiniteWarning, stacklevel=2)
        out.append(arr)
    if job.buffer and any(a.shape != out[0].shape or not np.array_equal(a, out[0]) for a in out[1:]):
        raise ValueError(f"tensor {job.name}: a non-float buffer ({out[0].dtype}) whose values differ between the "
                         f"models ({', '.join(m for m, _ in job.inputs)}); only a buffer they agree on is copied")
    if job.vocab and vocabulary is not None:  # rows in the loaded dtype, as mergekit averages them
        rows = rebuild_rows(vocabulary, {m: a if load is None else a.astype(load) for (m, _), a in zip(job.inputs, out)},
                            job.name)
        out = [rows[m] for m, _ in job.inputs]
    if job.buffer:
        return out  # host arrays: JAX (without x64) would make int64 int32
    return [jax.device_put(a) for a in out]


def _timed_load(*args) -> tuple[list, float]:
    started = time.perf_counter()
    out = _load(*args)
    return out, time.perf_counter() - started


def _input_bytes(readers: dict[str, CheckpointReader], job: TensorJob) -> int:
    return sum(int(np.prod(readers[m].shape(n), dtype=np.int64)) * readers[m].dtype(n).itemsize
               for m, n in job.inputs)


def run_plan(plan: MergePlan, readers: dict[str, CheckpointReader], out_dir: str, *,
             max_shard_size: int = 5 * 10**9, seed: int = 0, prefetch: int = 2,
             prefetch_bytes: int = PREFETCH_BYTES, progress: bool = True,
             allow_nonfinite: bool = False, compute_dtype: str = "mergekit",
             on_tensor: Callable[[TensorTiming], None] | None = None) -> None:
    """Merge every job of `plan` and write the tensors into `out_dir` (safetensors shards only).

    `prefetch` / `prefetch_bytes`: read-ahead limits; `allow_nonfinite`, `compute_dtype`, `on_tensor`:
    see merge_recipe.
    On any exception (KeyboardInterrupt included) the read-ahead threads and the writer thread are
    stopped and joined, and every dispatched merge has finished, before the exception propagates.
    """
    # tqdm loads only for a progress bar
    from tqdm.auto import tqdm

    method = plan.method
    root = jax.random.PRNGKey(seed) if method.random else None
    specs = {job.name: (job.shape, _dtypes(plan, job)[1]) for job in plan.jobs}
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in specs.values())
    writer = ShardedWriter(out_dir, specs, max_shard_size=max_shard_size)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({method.name})", disable=not progress)
    done: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    stop = threading.Event()  # set when the main thread gives up: the writer drains without writing

    def write_loop():
        while True:
            item = done.get()
            if item is None:
                return
            name, result, timing = item
            if failure or stop.is_set():
                _settle(result)  # drain so the producer never blocks; wait, so nothing runs on at exit
                continue
            try:
                started = time.perf_counter()
                arr = np.asarray(result)
                bad = count_nonfinite(arr)
                if bad:
                    msg = (f"merged tensor {name}: {bad} of {arr.size} values are NaN/Inf (check the "
                           "weights and parameters of this tensor)")
                    if not allow_nonfinite:
                        raise NonFiniteError(msg + "; nothing was written")
                    warnings.warn(msg, NonFiniteWarning, stacklevel=1)
                writer.write(name, arr)
                bar.update(arr.nbytes)
                if on_tensor is not None:
                    on_tensor(timing._replace(write_s=time.perf_counter() - started))
            except BaseException as e:  # re-raised in the main thread
                failure.append(e)

    writer_thread = threading.Thread(target=write_loop, name="hm3jax-merge-writer", daemon=True)
    writer_thread.start()
    pool = cf.ThreadPoolExecutor(max_workers=max(1, min(prefetch, 4)), thread_name_prefix="hm3jax-merge-load")
    pending: collections.deque = collections.deque()  # (job, future, input bytes), loading or loaded
    jobs = plan.jobs
    state = {"next": 0, "ahead": 0}  # next job to submit; input bytes in `pending`

    def submit() -> None:
        job = jobs[state["next"]]
        nbytes = _input_bytes(readers, job)
        pending.append((job, pool.submit(_timed_load, readers, job, allow_nonfinite, plan.vocabulary,
                                         _dtypes(plan, job)[0]), nbytes))
        state["next"] += 1
        state["ahead"] += nbytes

    def read_ahead() -> None:
        # Up to `prefetch` jobs ahead of the one being merged; past the first, only while their
        # inputs fit in `prefetch_bytes` (a large tensor's inputs are not queued behind another's).
        while len(pending) < prefetch and state["next"] < len(jobs):
            if pending and state["ahead"] + _input_bytes(readers, jobs[state["next"]]) > prefetch_bytes:
                break
            submit()

    in_flight = None  # a dispatched result not yet handed to the writer
    try:
        while pending or state["next"] < len(jobs):
            interrupt.check()
            if not pending:
                submit()
            job, fut, nbytes = pending.popleft()
            state["ahead"] -= nbytes
            read_ahead()
            arrays, load_s = fut.result()
            if failure:
                raise failure[0]
            timing = TensorTiming(job.name, tuple(job.shape), str(_dtypes(plan, job)[1]), load_s, 0.0, 0.0)
            if job.buffer:  # copied, not merged
                done.put((job.name, arrays[0], timing))
                del arrays
                continue
            base = arrays[job.base] if job.base is not None else None
            models = tuple(a for i, a in enumerate(arrays) if i != job.base)
            static, traced, weights = _arguments(method, job)
            load, out = _dtypes(plan, job)
            rng = tensor_key(root, job.name) if root is not None else None
            started = time.perf_counter()
            in_flight = merge_leaf(base, models, weights, rng, None, traced, merge_tensor=method.merge_tensor,
                                   random=method.random, static=static, load_dtype=load, out_dtype=out,
                                   compute_dtype=_compute_dtype(plan, job, load, compute_dtype))
            if on_tensor is not None:  # exact per-tensor times: wait for this merge before the next
                jax.block_until_ready(in_flight)
                timing = timing._replace(merge_s=time.perf_counter() - started)
            done.put((job.name, in_flight, timing))
            in_flight = None
            del arrays, base, models
    except BaseException:
        stop.set()
        _settle(in_flight)
        raise
    finally:
        # In order: no new loads, wait for the running ones (they read the input files the caller
        # closes next); then let the writer drain and finish; only then return or raise.
        for _, fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        pending.clear()
        done.put(None)
        writer_thread.join()
        bar.close()
    if failure:
        raise failure[0]
    writer.close()


def _settle(result: Any) -> None:
    """Wait until a dispatched computation has finished (its errors are not ours to report)."""
    try:
        jax.block_until_ready(result)
    except Exception:
        pass
