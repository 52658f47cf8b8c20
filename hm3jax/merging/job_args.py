"""What one tensor job of the out-of-core merge is computed with: the dtype its inputs are rounded to
on load and the dtype it is written in (`job_dtypes`), the dtype its arithmetic runs in
(`job_compute_dtype`, per `compute_dtype`: COMPUTE_DTYPES, NATIVE_DTYPE_METHODS), and its method's
parameters as the jitted merge takes them (`job_arguments`).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from hm3jax.merging.base import MergeMethod
from hm3jax.merging.plan import MergePlan, TensorJob
from hm3jax.merging.task_arithmetic import LOW_PRECISION
from hm3jax.merging.task_arithmetic import METHODS as TA_METHODS

_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
              "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def job_dtypes(plan: MergePlan, job: TensorJob) -> tuple[np.dtype | None, np.dtype]:
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


def job_compute_dtype(plan: MergePlan, job: TensorJob, load: np.dtype | None, how: str) -> np.dtype:
    """The dtype a job's arithmetic runs in under `compute_dtype=how` (see merge_recipe)."""
    if how not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {how!r}: supported: {', '.join(COMPUTE_DTYPES)}")
    native = np.dtype(load or job.in_dtype)
    if how == "mergekit" and plan.method.name in NATIVE_DTYPE_METHODS and native in LOW_PRECISION:
        return native
    return np.dtype(np.float32)


def job_arguments(method: MergeMethod, job: TensorJob) -> tuple[tuple, dict, np.ndarray | None]:
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
