"""The threaded read/compute/write pipeline of the out-of-core merge: `run_plan` merges every job of a
plan tensor by tensor from safetensors checkpoints into sharded safetensors output, with reading,
computing and writing overlapped.

Pipeline: a small thread pool loads the next `prefetch` jobs' input tensors (at most `prefetch_bytes`
of them beyond the first), each copied from its shard with pread into a buffer of its own and put on
the device; the main thread dispatches the jitted per-tensor merge (one compilation per method
settings and tensor shape: parameter values are arguments, so gradients over layers do not
recompile); a writer thread waits for each result and writes it at its offset in the pre-laid-out
output shards. Inputs are not memory-mapped (mapped pages, once read, would count in the process's
resident memory until the end), so the input files stay in the page cache only. Peak resident memory
is about the inputs of the tensor being merged and of those loaded ahead, two or three outputs, and
the method's temporaries for one tensor (for the largest tensor these dominate).

Every input tensor (on load) and every merged tensor (before it is written) is checked for NaN/Inf
(finite.py). When interrupted (KeyboardInterrupt), the read-ahead threads and the writer thread are
stopped and joined, and every dispatched computation is waited for, before the exception propagates.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from hm3jax.io import interrupt
from hm3jax.io.safetensors_io import CheckpointReader
from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.merging.base import merge_leaf, tensor_key
from hm3jax.merging.finite import NonFiniteError, NonFiniteWarning, count_nonfinite
from hm3jax.merging.job_args import job_arguments, job_compute_dtype, job_dtypes
from hm3jax.merging.plan import MergePlan, TensorJob
from hm3jax.merging.vocab import Vocabulary, rebuild_rows

PREFETCH_BYTES = 512 * 2**20  # default cap on the input bytes loaded ahead of the merge


class TensorTiming(NamedTuple):
    """Seconds spent on one output tensor (`on_tensor` of merge_recipe / run_plan)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load_s: float  # reading the inputs (a read-ahead thread)
    merge_s: float  # the jitted merge, dispatch to result (0 for a copied buffer)
    write_s: float  # the NaN/Inf check and the write into its shard


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
    specs = {job.name: (job.shape, job_dtypes(plan, job)[1]) for job in plan.jobs}
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
                                         job_dtypes(plan, job)[0]), nbytes))
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
            load, out = job_dtypes(plan, job)
            timing = TensorTiming(job.name, tuple(job.shape), str(out), load_s, 0.0, 0.0)
            if job.buffer:  # copied, not merged
                done.put((job.name, arrays[0], timing))
                del arrays
                continue
            base = arrays[job.base] if job.base is not None else None
            models = tuple(a for i, a in enumerate(arrays) if i != job.base)
            static, traced, weights = job_arguments(method, job)
            rng = tensor_key(root, job.name) if root is not None else None
            started = time.perf_counter()
            in_flight = merge_leaf(base, models, weights, rng, None, traced, merge_tensor=method.merge_tensor,
                                   random=method.random, static=static, load_dtype=load, out_dtype=out,
                                   compute_dtype=job_compute_dtype(plan, job, load, compute_dtype))
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
